"""The worker node: one thread solves one subtask.

A thread waits for the results it depends on, then either forks (runs the same graph on its
subtask, one level deeper) or makes one streamed model call. A result that fails verification
or reports a dead end is replaced by a fresh attempt while the budget allows. In a vote or a
race the thread reports its result to the board, which may settle the run and cancel the rest.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel

from apr_graph.answers import dead_end, final_answer
from apr_graph.board import DEFERRED, Boards, RunBoard, deferred_record
from apr_graph.budget import StoppedError
from apr_graph.errors import (
    AuthenticationError,
    BudgetExhaustedError,
    ModelCallError,
    ModelNotFoundError,
    ServerCapabilityError,
)
from apr_graph.events import emit, token_emitter
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.nodes.goal_call import goal_call
from apr_graph.nodes.tool_loop import run_call, tool_loop
from apr_graph.prompts import shared_system, verifier_messages, worker_messages
from apr_graph.responses import Completion, Message, StreamProgress, prompt_estimate
from apr_graph.retry import CallBudget
from apr_graph.settings import AprSettings
from apr_graph.state import CallRecord, SubtaskRecord, ThreadRecord, ThreadStatus, WorkerInput

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

__all__ = ["Verifier", "make_worker", "thread_call"]

Verifier = Callable[[str], bool | Awaitable[bool]]
"""A user check of a thread's answer: ``verify(answer) -> bool`` (sync or async)."""

Subgraph = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Verdict(BaseModel):
    """A verifier model's judgement of one result."""

    valid: bool
    reason: str = ""


@dataclass
class _Thread:
    """What one thread accumulates while it runs."""

    payload: WorkerInput
    started: float
    calls: list[CallRecord]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0

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
        return ThreadRecord(
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


def make_worker(
    client: LLMClient,
    boards: Boards,
    *,
    verify: Verifier | None,
    subgraph: Callable[[AprSettings], Subgraph],
    tools: Sequence[BaseTool] = (),
) -> Callable[[WorkerInput, AprSettings], Awaitable[dict[str, Any]]]:
    """Build the worker node (given each run's settings); ``subgraph(settings)`` returns the
    graph a forking thread runs, with its run's settings."""

    async def worker(payload: WorkerInput, settings: AprSettings) -> dict[str, Any]:
        payload = _current(payload)
        board = boards.get(payload["run_id"]) or boards.revive(
            settings, payload["run_id"], merge=payload["merge"], width=payload["width"]
        )
        thread = _Thread(payload, time.time(), [])
        sid = thread.subtask["id"]
        try:
            dependencies = await _dependencies(board, payload)
        except StoppedError as stop:
            return _finish(board, boards, thread, thread.record("skipped", error=stop.reason))
        if dependencies is None:  # the join sends it again, with the results it needs
            board.defer(sid)
            return {"waiting": [sid]}
        early = board.early.get(sid)
        if early is not None:  # its request went out while the plan was being written
            thread.started = early.started
        else:
            thread.started = time.time()
            emit(
                "thread_started",
                id=sid,
                goal=thread.subtask["goal"],
                at=thread.started,
                depth=payload["depth"] + 1,
            )
        done_deps = [
            (d["id"], d["goal"], d["answer"] or "") for d in dependencies if d["status"] == "done"
        ]
        failed_deps = [d["id"] for d in dependencies if d["status"] != "done"]
        if failed_deps:
            done_deps += [(d, "", "(this dependency did not finish)") for d in failed_deps]
        if thread.subtask.get("fork"):
            return await _fork(board, boards, thread, done_deps, subgraph(settings))
        llm = client.for_run(settings)
        return await _solve(llm, settings, board, boards, thread, done_deps, verify, tools)

    return worker


async def _solve(
    client: LLMClient,
    settings: AprSettings,
    board: RunBoard,
    boards: Boards,
    thread: _Thread,
    dependencies: list[tuple[str, str, str]],
    verify: Verifier | None,
    tools: Sequence[BaseTool] = (),
) -> dict[str, Any]:
    payload, subtask = thread.payload, thread.subtask
    must_verify = verify is not None or board.merge == "race"
    rejected: str | None = None
    widened: int | None = None  # the allowance of the one retry of an answer cut off
    if board.system is None:
        board.system = shared_system(
            payload["task"], payload["context"], tools=bool(tools), merge=payload["merge"]
        )
    call = (
        goal_call(subtask["goal"], tools) if tools and not (dependencies or must_verify) else None
    )
    if call is not None:  # the planner wrote the call itself: run it, no model needed
        try:
            result, ok = await board.guard(run_call(tools, call, subtask["id"]))
        except (StoppedError, BudgetExhaustedError) as stop:
            reason = board.stop_reason or str(stop)
            return _finish(
                board, boards, thread, thread.record("skipped", error=f"skipped: {reason}")
            )
        if ok:  # else the model is asked, as for any goal
            thread.attempts += 1
            return _finish(board, boards, thread, thread.record("done", answer=result))
    while True:
        thread.attempts += 1
        messages = worker_messages(
            payload["task"],
            payload["context"],
            payload["merge"],
            subtask,
            dependencies=dependencies,
            rejected=rejected,
            system=board.system,
        )
        progress = StreamProgress(
            on_text=token_emitter(subtask["id"]) if settings.stream_tokens else None
        )
        allowance = widened or subtask.get("max_tokens") or settings.worker_max_tokens
        early = board.early.pop(subtask["id"], None)
        if early is not None and not early.matches(messages, allowance, subtask):
            if (discarded := early.cancel(board.budget.charge)) is not None:
                thread.calls.append(discarded)
            early = None
        work: Awaitable[Completion]
        try:
            if early is not None:
                early.adopt(progress.on_text)
                progress = early.progress
                work = early.task
            elif tools:
                work = tool_loop(
                    client,
                    settings,
                    board.budget,
                    subtask["id"],
                    messages,
                    tools,
                    allowance,
                    progress=progress,
                )
            else:
                work = thread_call(client, messages, subtask, allowance, progress, board.budget)
            completion = await board.guard(work)
        except (StoppedError, BudgetExhaustedError) as stop:
            # Count what the cancelled request produced; the prompt was paid for too.
            sent = progress.started_at > 0
            prompt = prompt_estimate(messages) if sent else 0
            thread.prompt_tokens += prompt
            thread.completion_tokens += progress.completion_tokens
            if not progress.charged:  # a complete answer was charged by the client already
                board.budget.charge(prompt + progress.completion_tokens)
            reason = board.stop_reason or str(stop)
            status: ThreadStatus = "cancelled" if sent else "skipped"
            record = thread.record(status, error=f"{status}: {reason}")
            return _finish(board, boards, thread, record)
        except (AuthenticationError, ModelNotFoundError, ServerCapabilityError):
            raise  # the whole run is misconfigured; no sibling can succeed either
        except ModelCallError as exc:
            if settings.on_thread_error == "fail":
                raise
            # One failed thread must not sink its siblings: record it, synthesis is told.
            return _finish(board, boards, thread, thread.record("failed", error=str(exc)))
        thread.prompt_tokens += completion.prompt_tokens
        thread.completion_tokens += completion.completion_tokens
        thread.calls.append(call_record(completion, role="worker", thread_id=subtask["id"]))
        text = completion.text
        cut = completion.finish_reason == "length"
        if cut and widened is None:
            # Cut mid-work by its token limit: one more try with twice the room, which does
            # not count as a replacement.
            widened = allowance * 2
            reason = f"cut off at its {allowance}-token limit; again with {widened}"
            emit("thread_retry", id=subtask["id"], attempt=thread.attempts + 1, reason=reason)
            continue
        if cut:  # cut again: keep what there is, and say so (the merge is told)
            error = f"truncated: cut off at its {allowance}-token limit"
            record = thread.record("truncated", answer=text, error=error)
            return _finish(board, boards, thread, record)
        gave_up = dead_end(text)
        if completion.unrun_tool_call is not None:
            # It needed a tool and did not get one to run: not an answer.
            valid, reason = False, f"the reply was not an answer: {completion.unrun_tool_call}"
        elif gave_up is not None:
            valid, reason = False, f"DEAD END: {gave_up}"
        elif must_verify:
            try:
                valid, reason = await board.guard(_verify(client, board, thread, text, verify))
            except (StoppedError, BudgetExhaustedError):
                reason = board.stop_reason or "budget"
                record = thread.record("cancelled", answer=text, error=f"cancelled: {reason}")
                return _finish(board, boards, thread, record)
        else:
            valid, reason = True, ""
        if valid:
            record = thread.record("done", answer=text, verified=True if must_verify else None)
            return _finish(board, boards, thread, record)
        replacements = thread.attempts - (widened is not None)
        if replacements > settings.max_replacements or board.budget.reserve_threads(1) == 0:
            dead = reason.startswith("DEAD END: ")
            error = f"dead end: {reason[10:]}" if dead else f"rejected: {reason}"
            record = thread.record("failed", answer=text, error=error, verified=False)
            return _finish(board, boards, thread, record)
        emit("thread_retry", id=subtask["id"], attempt=thread.attempts + 1, reason=reason)
        rejected = reason


async def _dependencies(board: RunBoard, payload: WorkerInput) -> list[ThreadRecord] | None:
    """The records of the subtask's dependencies, or None if it must defer to the join.

    A thread waits only for siblings that run beside it in this process (``scheduled``):
    those hold an execution slot already, so waiting never starves the step. A dependency
    that finished before a crash, or runs later, is not waited for: the thread defers, and
    the join sends it again with the results read from graph state.
    """
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


def _current(payload: WorkerInput) -> WorkerInput:
    """``payload`` as this version writes it: one checkpointed by an earlier version (a
    run resumed after an upgrade) carried the whole plan instead of its merge and width."""
    legacy = cast(dict[str, Any], payload)
    if "merge" in legacy or not isinstance(plan := legacy.get("plan"), dict):
        return payload
    merge, width = plan.get("merge") or "synthesize", len(plan.get("subtasks") or [])
    return cast(WorkerInput, {**legacy, "merge": merge, "width": width})


def thread_call(
    client: LLMClient,
    messages: list[Message],
    subtask: SubtaskRecord,
    allowance: int,
    progress: StreamProgress,
    budget: CallBudget,
) -> Coroutine[Any, Any, Completion]:
    """A thread's streamed model call (its first may be sent early, while the plan streams:
    ``LLMClient.start``)."""
    return client.chat(
        messages,
        role="worker",
        stream=True,
        progress=progress,
        max_tokens=allowance,
        budget=budget,
        temperature=subtask.get("temperature"),
    )


async def _verify(
    client: LLMClient, board: RunBoard, thread: _Thread, text: str, verify: Verifier | None
) -> tuple[bool, str]:
    if verify is not None:
        outcome = verify(text)
        ok = await outcome if inspect.isawaitable(outcome) else outcome
        return bool(ok), "" if ok else "the verifier rejected this result"
    payload = thread.payload
    messages = verifier_messages(
        payload["task"],
        payload["context"],
        thread.subtask,
        text,
        system=board.system,
    )
    verdict, completion = await client.structured(
        messages, Verdict, role="synthesizer", budget=board.budget
    )
    thread.calls.append(call_record(completion, role="verifier", thread_id=thread.subtask["id"]))
    return verdict.valid, verdict.reason or "the verifier found it wrong"


async def _fork(
    board: RunBoard,
    boards: Boards,
    thread: _Thread,
    dependencies: list[tuple[str, str, str]],
    subgraph: Subgraph,
) -> dict[str, Any]:
    """Run the same graph on this subtask, one level deeper, and fold its result back."""
    payload, sid = thread.payload, thread.subtask["id"]
    context = payload["context"]
    if dependencies:
        context += "\n\n" + "\n\n".join(f"Result of {d}: {text}" for d, _, text in dependencies)
    thread.attempts = 1
    child_input = {
        "task": thread.subtask["goal"],
        "context": context.strip(),
        "depth": payload["depth"] + 1,
        "parent_run": board.run_id,
    }
    try:
        child = await board.guard(subgraph(child_input))
    except StoppedError as stop:
        return _finish(board, boards, thread, thread.record("cancelled", error=stop.reason))
    except (AuthenticationError, ModelNotFoundError, ServerCapabilityError):
        raise
    except ModelCallError as exc:
        return _finish(board, boards, thread, thread.record("failed", error=str(exc)))
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
    result = _finish(board, boards, thread, record)
    result["threads"] = result["threads"] + nested
    return result


def _finish(
    board: RunBoard, boards: Boards, thread: _Thread, record: ThreadRecord
) -> dict[str, Any]:
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
    emit(
        "thread_finished",
        id=sid,
        status=record["status"],
        completion_tokens=record["completion_tokens"],
        elapsed_s=round(record["ended_at"] - record["started_at"], 3),
        error=record["error"],
        answer=record["answer"],
        depth=record["depth"],
    )
    return {"threads": [record], "calls": thread.calls}
