"""The worker node: one thread solves one subtask."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from apr_graph.errors import AuthenticationError, ModelCallError, ModelNotFoundError
from apr_graph.events import emit
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.prompts import worker_messages
from apr_graph.state import ThreadRecord, WorkerInput

__all__ = ["make_worker"]


def make_worker(client: LLMClient) -> Callable[[WorkerInput], Awaitable[dict[str, Any]]]:
    """Build the worker node."""

    async def worker(payload: WorkerInput) -> dict[str, Any]:
        subtask = payload["subtask"]
        messages = worker_messages(payload["task"], payload["context"], payload["plan"], subtask)
        started = time.time()
        emit("thread_started", id=subtask["id"], goal=subtask["goal"], at=started)
        try:
            completion = await client.chat(messages, role="worker")
        except (AuthenticationError, ModelNotFoundError):
            raise  # the whole run is misconfigured; no sibling can succeed either
        except ModelCallError as exc:
            # One failed thread must not sink its siblings: record it, synthesis is told.
            failed = ThreadRecord(
                id=subtask["id"],
                goal=subtask["goal"],
                status="failed",
                answer=None,
                error=str(exc),
                prompt_tokens=0,
                completion_tokens=0,
                started_at=started,
                ended_at=time.time(),
            )
            emit(
                "thread_finished",
                id=subtask["id"],
                status="failed",
                completion_tokens=0,
                elapsed_s=round(time.time() - started, 3),
                error=str(exc),
                answer=None,
            )
            return {"threads": [failed]}
        record = ThreadRecord(
            id=subtask["id"],
            goal=subtask["goal"],
            status="done",
            answer=completion.text,
            error=None,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            started_at=completion.started_at,
            ended_at=completion.ended_at,
        )
        emit(
            "thread_finished",
            id=subtask["id"],
            status="done",
            completion_tokens=completion.completion_tokens,
            elapsed_s=round(completion.ended_at - started, 3),
            error=None,
            answer=completion.text,
        )
        return {
            "threads": [record],
            "calls": [call_record(completion, role="worker", thread_id=subtask["id"])],
        }

    return worker
