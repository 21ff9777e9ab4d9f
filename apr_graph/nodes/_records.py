"""Turning a client ``Completion`` into the JSON-shaped records kept in graph state."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from apr_graph.errors import StructuredOutputError
from apr_graph.responses import Completion, Message, StreamProgress, prompt_estimate
from apr_graph.state import CallRecord

__all__ = ["call_record", "failed_record", "stopped_record"]


def call_record(completion: Completion, *, role: str, thread_id: str | None = None) -> CallRecord:
    """The state record of one model call."""
    return CallRecord(
        role=role,
        thread_id=thread_id,
        model=completion.model,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        cached_tokens=completion.cached_tokens,
        requests=completion.requests,
        started_at=completion.started_at,
        ended_at=completion.ended_at,
        mode=completion.mode,
        first_token_at=completion.first_token_at,
        finish_reason=completion.finish_reason,
        loop_saved_tokens=completion.loop_saved_tokens,
    )


def stopped_record(
    progress: StreamProgress,
    messages: Sequence[Message],
    *,
    role: str,
    model: str,
    mode: str,
    charge: Callable[[int], None],
    thread_id: str | None = None,
) -> CallRecord | None:
    """The record of a request stopped before its reply ended (its prompt estimated), its
    cost given to ``charge`` unless the client charged it; ``None`` if it was never sent."""
    if progress.started_at <= 0:
        return None
    prompt = prompt_estimate(messages)
    if not progress.charged:
        charge(prompt + progress.completion_tokens)
    return CallRecord(
        role=role,
        thread_id=thread_id,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=progress.completion_tokens,
        cached_tokens=None,
        requests=max(1, progress.requests),
        started_at=progress.started_at,
        ended_at=time.time(),
        mode=mode,
        first_token_at=progress.first_token_at,
    )


def failed_record(
    exc: StructuredOutputError, *, role: str, model: str, started: float
) -> CallRecord:
    """The record of a structured call whose attempts all failed (what they cost)."""
    return CallRecord(
        role=role,
        thread_id=None,
        model=model,
        prompt_tokens=exc.prompt_tokens,
        completion_tokens=exc.completion_tokens,
        cached_tokens=None,
        requests=exc.attempts,
        started_at=started,
        ended_at=time.time(),
        mode="failed",
    )
