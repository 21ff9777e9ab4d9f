"""One thread's bookkeeping: its record, the results it needs first, its fork one level
deeper, the update it leaves in graph state, and its streamed model call."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apr_graph.answers import final_answer
from apr_graph.board import DEFERRED, RunBoard, deferred_record
from apr_graph.budget import Budget, StoppedError
from apr_graph.errors import (
    AuthenticationError,
    ModelCallError,
    ModelNotFoundError,
    ServerCapabilityError,
    ServerUnreachableError,
)
from apr_graph.events import emit
from apr_graph.loops import asks_for_input_text
from apr_graph.responses import Completion, Message, StreamProgress
from apr_graph.retry import CallBudget
from apr_graph.state import (
    CallRecord,
    LoopRecord,
    SubtaskRecord,
    ThreadRecord,
    ThreadStatus,
    WorkerInput,
)

if TYPE_CHECKING:
    from apr_graph.llm import LLMClient
    from apr_graph.settings import AprSettings

__all__ = [
    "REPEATED",
    "RUN_FATAL",
    "Subgraph",
    "Thread",
    "copy_watch",
    "dependencies_of",
    "finish_thread",
    "fork_thread",
    "fresh_attempt",
    "retry_temperature",
    "thread_call",
]

Subgraph = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

RUN_FATAL = (AuthenticationError, ModelNotFoundError, ServerCapabilityError, ServerUnreachableError)
"""Errors no sibling thread can escape either, raised as they are: a misconfigured run, or a
server gone (after the retries). Recorded as a failed thread, a server that went away would
stay that thread's result on every resume; raised, the run stops where it is, in its
checkpoint, and a resume once the server is back runs the thread again."""


@dataclass
class Thread:
    """What one thread accumulates while it runs."""

    payload: WorkerInput
    started: float
    calls: list[CallRecord]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    looped: LoopRecord | None = None
    context: str = ""
    """The context this thread is given, rendered (``inputs.thread_context``)."""
    documents: list[str] | None = None
    """The names of its documents, when it is given a part of the context's documents."""

    @property
    def subtask(self) -> SubtaskRecord:
        return self.payload["subtask"]

    def record(
        self,
        status: ThreadStatus,
        *,
        answer: str | None = None,
        error: str | None = None,
        verified: bool | None = None,
        critical: int | None = None,
    ) -> ThreadRecord:
        record = ThreadRecord(
            id=self.subtask["id"],
            goal=self.subtask["goal"],
            status=status,
            answer=answer,
            error=error,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            critical_path_tokens=self.completion_tokens if critical is None else critical,
            started_at=self.started,
            ended_at=time.time(),
            depth=self.payload["depth"] + 1,
            parent=None,
            attempts=self.attempts,
            verified=verified,
        )
        if self.looped is not None:
            record["looped"] = self.looped
        return record


async def dependencies_of(board: RunBoard, payload: WorkerInput) -> list[ThreadRecord] | None:
    """The records of the subtask's dependencies, or None if it must defer to the join
    (which sends it again with the results from graph state). It waits only for siblings
    running beside it (``scheduled``): they hold a slot already, so the step never starves."""
    wanted = payload["subtask"].get("depends_on") or []
    given = payload.get("dependencies")
    if given is not None:  # sent again by the join: what is missing did not finish
        found = {d["id"]: d for d in given}
        return [found[d] if d in found else _missing(d) for d in wanted]
    if not board.can_wait_for(wanted):
        return None
    records = await board.wait_for(wanted)
    return None if any(r["error"] == DEFERRED for r in records) else records


def _missing(thread_id: str) -> ThreadRecord:
    return {**deferred_record(thread_id), "status": "failed", "error": "did not finish"}


async def fork_thread(
    board: RunBoard,
    thread: Thread,
    dependencies: list[tuple[str, str, str]],
    subgraph: Subgraph,
) -> dict[str, Any]:
    """Run the same graph on this subtask, one level deeper, and fold its result back."""
    payload, sid = thread.payload, thread.subtask["id"]
    given = payload["context"]
    context: str | dict[str, str]
    if isinstance(given, Mapping):  # the nested run gets this thread's documents, as documents
        names = thread.documents if thread.documents is not None else list(given)
        context = {name: given[name] for name in names}
        context.update({f"result of {d}": text for d, _, text in dependencies})
    else:
        results = [f"Result of {d}: {text}" for d, _, text in dependencies]
        context = "\n\n".join([thread.context, *results]).strip()
    thread.attempts = 1
    child_input = {
        "task": thread.subtask["goal"],
        "context": context,
        "depth": payload["depth"] + 1,
        "parent_run": board.run_id,
    }
    try:
        child = await board.guard(subgraph(child_input))
    except StoppedError as stop:
        return finish_thread(board, thread, thread.record("cancelled", error=stop.reason))
    except RUN_FATAL:
        raise
    except ModelCallError as exc:
        return finish_thread(board, thread, thread.record("failed", error=str(exc)))
    metrics = child.get("metrics") or {}
    thread.prompt_tokens = int(metrics.get("prompt_tokens", 0))
    thread.completion_tokens = int(metrics.get("completion_tokens", 0))
    incomplete = bool(metrics.get("incomplete"))
    record = thread.record(
        "cancelled" if incomplete else "done",
        answer=child.get("answer"),
        error="incomplete: " + ", ".join(metrics.get("missing", [])) if incomplete else None,
        critical=int(metrics.get("critical_path_tokens", 0)),
    )
    nested = [
        {**t, "id": f"{sid}/{t['id']}", "parent": f"{sid}/{t['parent']}" if t["parent"] else sid}
        for t in child.get("threads") or []
    ]
    thread.calls.extend(
        {**c, "thread_id": f"{sid}/{c['thread_id']}" if c["thread_id"] else sid}  # type: ignore[typeddict-item]
        for c in child.get("calls") or []
    )
    result = finish_thread(board, thread, record)
    result["threads"] = result["threads"] + nested
    return result


def finish_thread(board: RunBoard, thread: Thread, record: ThreadRecord) -> dict[str, Any]:
    """Publish the record, do the vote/race bookkeeping, emit the event, build the update."""
    sid = record["id"]
    board.finished.add(sid)
    board.publish(record)
    if record["status"] == "done" and record["answer"]:
        if board.merge == "vote":
            board.vote(sid, final_answer(record["answer"]))
        elif board.merge == "race" and record["verified"]:
            board.settle(sid, "race")
    if record["status"] == "cancelled":
        emit(
            "thread_cancelled",
            id=sid,
            reason=record["error"],
            completion_tokens=record["completion_tokens"],
        )
    emit_finished(record)
    return {"threads": [record], "calls": thread.calls}


def emit_finished(record: ThreadRecord) -> None:
    """Emit the ``thread_finished`` event of a thread's final ``record``."""
    emit(
        "thread_finished",
        id=record["id"],
        status=record["status"],
        completion_tokens=record["completion_tokens"],
        elapsed_s=round(record["ended_at"] - record["started_at"], 3),
        error=record["error"],
        answer=record["answer"],
        depth=record["depth"],
    )


def copy_watch(settings: AprSettings, task: str, goal: str) -> int:
    """Lines of its input a thread's reply may write out again before it is cut there:
    ``stop_copy_lines``, unless the task or the goal asks for documents changed or quoted."""
    return 0 if asks_for_input_text(task, goal) else settings.stop_copy_lines


REPEATED = "it started repeating itself after about {kept} tokens. Say each point once, then stop"
"""The reason a reply that looped early is given with its fresh attempt."""


def fresh_attempt(settings: AprSettings, budget: Budget, kept: int, allowance: int) -> bool:
    """Whether a reply cut where it began repeating itself, ``kept`` tokens in, gets one
    fresh attempt at the same ``allowance``: only a loop before an eighth of it does, with
    ``retry_loops`` on and room left in the run's budget and deadline."""
    return settings.retry_loops and kept < allowance // 8 and budget.room_for(allowance)


def retry_temperature(settings: AprSettings, own: float | None = None) -> float:
    """The temperature of a fresh attempt after a loop: ``loop_retry_temperature``, or the
    call's ``own`` (else the settings') when that is higher."""
    return max(settings.loop_retry_temperature, settings.temperature if own is None else own)


def thread_call(
    client: LLMClient,
    messages: list[Message],
    subtask: SubtaskRecord,
    allowance: int,
    progress: StreamProgress,
    budget: CallBudget,
    *,
    copy_lines: int,
    temperature: float | None = None,
) -> Coroutine[Any, Any, Completion]:
    """A thread's streamed model call (its first may be sent early, while the plan streams:
    ``LLMClient.start``); a reply that writes out ``copy_lines`` lines of its input again is
    cut where the copy began (``copy_watch``; 0: never). ``temperature``: this call's, else
    the subtask's (a vote's), else the settings'."""
    progress.copy_source = "\n".join(str(m.get("content") or "") for m in messages)
    progress.copy_lines = copy_lines
    return client.chat(
        messages,
        role="worker",
        stream=True,
        progress=progress,
        max_tokens=allowance,
        budget=budget,
        temperature=subtask.get("temperature") if temperature is None else temperature,
        thread=subtask["id"],
    )
