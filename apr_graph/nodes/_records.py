"""Turning a client ``Completion`` into the JSON-shaped records kept in graph state."""

from __future__ import annotations

from apr_graph.responses import Completion
from apr_graph.state import CallRecord

__all__ = ["call_record"]


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
