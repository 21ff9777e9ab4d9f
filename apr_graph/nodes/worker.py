"""The worker node: one thread solves one subtask.

A thread waits for the results it depends on, then forks (runs the graph on its subtask, one
level deeper) or makes one streamed model call. A result that fails verification or reports a
dead end is replaced by a fresh attempt while the budget allows.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel

from apr_graph.answers import dead_end
from apr_graph.board import Boards, RunBoard
from apr_graph.budget import StoppedError
from apr_graph.errors import BudgetExhaustedError, ModelCallError
from apr_graph.events import emit, token_emitter
from apr_graph.inputs import render_context, thread_context
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.nodes.goal_call import goal_call
from apr_graph.nodes.thread import (
    REPEATED,
    RUN_FATAL,
    Subgraph,
    Thread,
    copy_watch,
    dependencies_of,
    finish_thread,
    fork_thread,
    fresh_attempt,
    retry_temperature,
    thread_call,
)
from apr_graph.nodes.tool_loop import run_call, tool_loop
from apr_graph.prompts import (
    continuation_messages,
    continued,
    shared_system,
    verifier_messages,
    worker_messages,
)
from apr_graph.responses import (
    LOOPED,
    Completion,
    StreamProgress,
    estimate_tokens,
    prompt_estimate,
    strip_reasoning,
)
from apr_graph.settings import AprSettings
from apr_graph.state import LoopRecord, ThreadStatus, WorkerInput

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

__all__ = ["Verifier", "make_worker"]

Verifier = Callable[[str], bool | Awaitable[bool]]
"""A user check of a thread's answer: ``verify(answer) -> bool`` (sync or async)."""


class Verdict(BaseModel):
    """A verifier model's judgement of one result."""

    valid: bool
    reason: str = ""


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
        board = boards.revive(
            settings, payload["run_id"], merge=payload["merge"], width=payload["width"]
        )
        if board.system is None:  # a run resumed in a new process: the whole context's
            board.system = shared_system(
                payload["task"],
                render_context(payload["context"]),
                tools=bool(tools),
                merge=payload["merge"],
            )
        thread = Thread(payload, time.time(), [])
        thread.context, thread.documents = thread_context(
            payload["context"], thread.subtask["goal"], settings.thread_documents
        )
        sid = thread.subtask["id"]
        try:
            dependencies = await dependencies_of(board, payload)
        except StoppedError as stop:
            return finish_thread(board, thread, thread.record("skipped", error=stop.reason))
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
                **({} if thread.documents is None else {"documents": thread.documents}),
            )
        done_deps = [
            (d["id"], d["goal"], d["answer"] or "") for d in dependencies if d["status"] == "done"
        ]
        failed_deps = [d["id"] for d in dependencies if d["status"] != "done"]
        done_deps += [(d, "", "(this dependency did not finish)") for d in failed_deps]
        if thread.subtask.get("fork"):
            return await fork_thread(board, thread, done_deps, subgraph(settings))
        llm = client.for_run(settings)
        return await _solve(llm, settings, board, thread, done_deps, verify, tools)

    return worker


async def _solve(
    client: LLMClient,
    settings: AprSettings,
    board: RunBoard,
    thread: Thread,
    dependencies: list[tuple[str, str, str]],
    verify: Verifier | None,
    tools: Sequence[BaseTool] = (),
) -> dict[str, Any]:
    payload, subtask = thread.payload, thread.subtask

    def end(status: ThreadStatus, **fields: Any) -> dict[str, Any]:
        return finish_thread(board, thread, thread.record(status, **fields))

    must_verify = verify is not None or board.merge == "race"
    rejected: str | None = None
    widened: int | None = None  # the allowance of the one retry of a tool thread cut off
    partial: str | None = None  # a reply cut off by its limit, which the next request continues
    system = board.system or ""
    if thread.documents is not None:  # its own documents: a prefix of its own
        system = shared_system(
            payload["task"],
            thread.context,
            tools=bool(tools),
            merge=payload["merge"],
            dead_end=not payload.get("piece"),
        )
    plain = tools and not (dependencies or must_verify)
    if plain and (call := goal_call(subtask["goal"], tools)) is not None:
        # The planner wrote the call itself: run it, no model needed.
        try:
            result, ok = await board.guard(run_call(tools, call, subtask["id"]))
        except (StoppedError, BudgetExhaustedError) as stop:
            return end("skipped", error=f"skipped: {board.stop_reason or stop}")
        if ok:  # else the model is asked, as for any goal
            thread.attempts += 1
            return end("done", answer=result)
    while True:
        thread.attempts += 1
        messages = worker_messages(
            payload["task"],
            thread.context,
            payload["merge"],
            subtask,
            dependencies=dependencies,
            rejected=rejected,
            system=system,
        )
        if partial is not None:
            messages = continuation_messages(messages, partial)
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
                early.relay.attach(progress.on_text)  # its text so far, and from now on
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
                copies = copy_watch(settings, payload["task"], subtask["goal"])
                after_loop = thread.looped is not None and partial is None  # sample anew
                own = subtask.get("temperature")
                work = thread_call(
                    client,
                    messages,
                    subtask,
                    allowance,
                    progress,
                    board.budget,
                    copy_lines=copies,
                    temperature=retry_temperature(settings, own) if after_loop else None,
                )
            completion = await board.guard(work)
        except (StoppedError, BudgetExhaustedError) as stop:
            # Count what the cancelled request produced; the prompt was paid for too.
            sent = progress.started_at > 0
            prompt = prompt_estimate(messages) if sent else 0
            thread.prompt_tokens += prompt
            thread.completion_tokens += progress.completion_tokens
            if not progress.charged:  # a complete answer was charged by the client already
                board.budget.charge(prompt + progress.completion_tokens)
            status: ThreadStatus = "cancelled" if sent else "skipped"
            # What it wrote before the stop is kept: a run out of time gives what it has.
            so_far = strip_reasoning(progress.text) if sent and not tools else ""
            so_far = so_far if partial is None else continued(partial, so_far)
            return end(
                status, answer=so_far or None, error=f"{status}: {board.stop_reason or stop}"
            )
        except RUN_FATAL:
            raise
        except ModelCallError as exc:
            if settings.on_thread_error == "fail":
                raise
            # One failed thread must not sink its siblings: record it, synthesis is told.
            return end("failed", error=str(exc))
        thread.prompt_tokens += completion.prompt_tokens
        thread.completion_tokens += completion.completion_tokens
        thread.calls.append(call_record(completion, role="worker", thread_id=subtask["id"]))
        text = completion.text if partial is None else continued(partial, completion.text)
        if completion.finish_reason == LOOPED:
            retry = _looped(settings, board, thread, progress, text, allowance)
            if retry is not None:
                rejected = retry
                continue
            return end("done", answer=text or None)
        cut = completion.finish_reason == "length"
        fitted = completion.max_tokens_sent
        if cut and fitted is not None:
            # The server's context, not the thread's allowance, cut it: more room cannot fit.
            error = f"truncated: the server's context left room for {fitted} tokens of output"
            return end("truncated", answer=text, error=error)
        if cut and widened is None and partial is None and thread.looped is None:
            # Cut mid-work by its token limit: one more request, which does not count as a
            # replacement. It goes on from where the reply stopped, with the same allowance
            # (the server's prefix cache holds the reply so far); a tool thread's transcript
            # cannot be continued, so it starts again with twice the room.
            if tools:
                widened = allowance * 2
                reason = f"cut off at its {allowance}-token limit; again with {widened}"
            else:
                partial = text
                reason = f"cut off at its {allowance}-token limit; continued for {allowance} more"
            emit("thread_retry", id=subtask["id"], attempt=thread.attempts + 1, reason=reason)
            continue
        if cut:  # cut again: keep what there is, and say so (the merge is told)
            limit = allowance if partial is None else 2 * allowance
            error = f"truncated: cut off at its {limit}-token limit"
            return end("truncated", answer=text, error=error)
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
                return end("cancelled", answer=text, error=f"cancelled: {reason}")
        else:
            valid, reason = True, ""
        if valid:
            return end("done", answer=text, verified=True if must_verify else None)
        replacements = thread.attempts - (widened is not None or partial is not None)
        if replacements > settings.max_replacements or board.budget.reserve_threads(1) == 0:
            dead = reason.startswith("DEAD END: ")
            error = f"dead end: {reason[10:]}" if dead else f"rejected: {reason}"
            return end("failed", answer=text, error=error, verified=False)
        emit("thread_retry", id=subtask["id"], attempt=thread.attempts + 1, reason=reason)
        rejected, partial = reason, None  # a fresh attempt, not a continuation


def _looped(
    settings: AprSettings,
    board: RunBoard,
    thread: Thread,
    progress: StreamProgress,
    text: str,
    allowance: int,
) -> str | None:
    """Record a reply cut where it started repeating itself; the reason for one fresh
    attempt (never with more room), else None (the text before the loop is the result). Only
    a loop that came early (before an eighth of the allowance) gets one, if the budget allows.
    """
    kept = estimate_tokens(text)
    loop = progress.loop
    copied = loop.copied_lines if loop else 0
    earlier = thread.looped["attempts"] if thread.looped else 0
    thread.looped = LoopRecord(
        at_tokens=kept,
        streamed_tokens=progress.loop_tokens,
        period_words=loop.period_words if loop else 0,
        attempts=earlier + 1,
    )
    if copied:
        thread.looped["copied_lines"] = copied
    sid = thread.subtask["id"]
    emit(
        "thread_looped",
        id=sid,
        attempt=thread.attempts,
        at_tokens=kept,
        streamed_tokens=progress.loop_tokens,
        saved_tokens=max(0, allowance - progress.completion_tokens),
        copied_lines=copied,
    )
    if earlier or not fresh_attempt(settings, board.budget, kept, allowance):
        return None
    reason = REPEATED.format(kept=kept)
    if copied:
        reason = f"it began writing out its input again after about {kept} tokens. Do not copy it"
    emit("thread_retry", id=sid, attempt=thread.attempts + 1, reason=reason)
    return reason


def _current(payload: WorkerInput) -> WorkerInput:
    """``payload`` as this version writes it: one checkpointed by an earlier version (a
    run resumed after an upgrade) carried the whole plan instead of its merge and width."""
    legacy = cast(dict[str, Any], payload)
    if "merge" in legacy or not isinstance(plan := legacy.get("plan"), dict):
        return payload
    merge, width = plan.get("merge") or "synthesize", len(plan.get("subtasks") or [])
    return cast(WorkerInput, {**legacy, "merge": merge, "width": width})


async def _verify(
    client: LLMClient, board: RunBoard, thread: Thread, text: str, verify: Verifier | None
) -> tuple[bool, str]:
    if verify is not None:
        outcome = verify(text)
        ok = await outcome if inspect.isawaitable(outcome) else outcome
        return bool(ok), "" if ok else "the verifier rejected this result"
    messages = verifier_messages(
        thread.payload["task"], thread.context, thread.subtask, text, system=board.system
    )
    verdict, completion = await client.structured(
        messages, Verdict, role="synthesizer", budget=board.budget
    )
    thread.calls.append(call_record(completion, role="verifier", thread_id=thread.subtask["id"]))
    return verdict.valid, verdict.reason or "the verifier found it wrong"
