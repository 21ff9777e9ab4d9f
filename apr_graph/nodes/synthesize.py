"""The synthesize node: turns the thread results, in plan order, into the answer.

``concat`` puts each part's answer under its subtask, with no call; ``synthesize`` asks the
model to merge every result; ``vote`` takes the majority final answer; ``race`` the first
verified result; ``best`` asks a judge to pick one. A run out of budget calls no model: the
answer is what finished, marked incomplete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from apr_graph.answers import final_answer, kept_in, majority, normalise_answer, words_in
from apr_graph.board import Boards, RunBoard
from apr_graph.budget import StoppedError
from apr_graph.errors import (
    BudgetExhaustedError,
    ContextOverflowError,
    ModelCallError,
    StructuredOutputError,
)
from apr_graph.events import answer_emitter, emit
from apr_graph.inputs import render_context
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.plan import plan_of
from apr_graph.prompts import judge_messages, shared_system, synthesizer_messages
from apr_graph.responses import StreamProgress
from apr_graph.settings import AprSettings
from apr_graph.state import AprState, CallRecord, ThreadRecord

__all__ = ["concatenate", "make_synthesize", "threads_in_plan_order"]


class Choice(BaseModel):
    """A judge's pick among candidate results."""

    best: str
    reason: str = ""


def threads_in_plan_order(state: AprState) -> list[ThreadRecord]:
    """This run's own thread records (not nested ones), sorted as the plan lists them."""
    order = {s["id"]: i for i, s in enumerate(plan_of(state)["subtasks"])}
    own = [t for t in state.get("threads") or [] if t.get("parent") is None]
    return sorted(own, key=lambda t: order.get(t["id"], len(order)))


def _partial_answer(threads: list[ThreadRecord], reason: str) -> str:
    """The answer of a run stopped by its deadline or budget: every result, whole or cut."""

    def cut(thread: ThreadRecord) -> bool:
        return thread["status"] in {"cancelled", "truncated"}

    shown = [
        t for t in threads if (t["answer"] or "").strip() and (t["status"] == "done" or cut(t))
    ]
    notes = [f"the {reason} was reached"]
    if cut_off := [t["id"] for t in shown if cut(t)]:
        notes.append(f"cut off: {', '.join(cut_off)}")
    if missing := [t["id"] for t in threads if t not in shown]:
        notes.append(f"missing subtasks: {', '.join(missing)}")
    parts = [f"{t['goal']}\n{t['answer']}" + ("\n(cut off here)" if cut(t) else "") for t in shown]
    return "\n\n".join([f"(incomplete: {'; '.join(notes)})", *parts])


def _result_text(thread: ThreadRecord) -> str:
    """What the merge sees of one thread: its answer, and whether it is whole."""
    answer = (thread["answer"] or "").strip()
    if thread["status"] == "truncated" and answer:
        return f"{answer}\n(note: this result is incomplete: {thread['error']})"
    if _dead_end(thread):
        return f"(this thread concluded that its subtask cannot be done: {thread['error']})"
    if thread["status"] != "done" or not answer:
        return f"(this thread {thread['status']}: {thread['error'] or 'empty answer'})"
    if "looped" in thread:
        what = (
            "writing out its input again"
            if thread["looped"].get("copied_lines")
            else "repeating itself"
        )
        return f"{answer}\n(note: this thread began {what} here and was stopped)"
    return answer


def _dead_end(thread: ThreadRecord) -> bool:
    return thread["status"] == "failed" and (thread["error"] or "").startswith("dead end:")


def _sole_survivor(
    threads: list[ThreadRecord], done: list[ThreadRecord], used: set[str]
) -> str | None:
    """The answer when one thread found it and every other one concluded a dead end (a merge
    call would only restate it): the dead ends named, then the result under its goal."""
    final = [t for t in done if t["id"] not in used]
    dead = [t for t in threads if _dead_end(t)]
    if len(final) != 1 or not dead or len(done) + len(dead) != len(threads):
        return None
    names = ", ".join(t["id"] for t in dead)
    verb = "their subtasks" if len(dead) > 1 else "its subtask"
    head = f"({names}: concluded that {verb} cannot be done; the answer is {final[0]['id']}'s)"
    return f"{head}\n\n{concatenate(final)}"


def concatenate(threads: list[ThreadRecord]) -> str:
    """Each part's answer under its subtask's goal, in plan order (the ``concat`` merge); a
    part without an answer says why."""
    parts = []
    for thread in threads:
        answer = (thread["answer"] or "").strip()
        if _dead_end(thread):
            answer = f"(no answer: {thread['error']})"
        elif thread["status"] not in {"done", "truncated"} or not answer:
            answer = f"(no answer: {thread['error'] or thread['status']})"
        elif thread["error"]:
            answer += f"\n(incomplete: {thread['error']})"
        parts.append(f"{thread['goal']}\n{answer}")
    return "\n\n".join(parts)


def make_synthesize(
    client: LLMClient, boards: Boards
) -> Callable[[AprState, AprSettings], Awaitable[dict[str, Any]]]:
    """Build the synthesize node (given each run's settings)."""

    async def synthesize(state: AprState, settings: AprSettings) -> dict[str, Any]:
        run_id = state.get("run_id", "")
        plan = plan_of(state)
        board = boards.revive(settings, run_id, merge=plan["merge"], width=len(plan["subtasks"]))
        board.catch_up(state.get("calls") or [])
        threads = threads_in_plan_order(state)
        done = [t for t in threads if t["status"] == "done" and (t["answer"] or "").strip()]
        if board.budget.exhausted:
            reason = board.budget.stop_reason or "budget"
            return {"answer": _partial_answer(threads, reason)}
        merge = board.merge
        if not done:
            cut = any(t["status"] == "truncated" and t["answer"] for t in threads)
            concluded = bool(threads) and all(_dead_end(t) for t in threads)
            if not cut and not concluded:
                reasons = "; ".join(f"{t['id']}: {t['error'] or 'empty answer'}" for t in threads)
                raise ModelCallError(
                    f"all {len(threads)} threads failed, nothing to merge ({reasons})",
                    url=client.base_url,
                )
            # Partial results, or every thread concluding its subtask cannot be done (a
            # puzzle with no solution): that is the answer to merge, not an error.
            merge = "concat" if merge == "concat" else "synthesize"
        calls: list[CallRecord] = []
        try:
            llm = client.for_run(settings)
            answer = await _merge(llm, board, state, threads, done, calls, merge)
        except (StoppedError, BudgetExhaustedError):
            answer = _partial_answer(threads, board.budget.stop_reason or "budget")
        except ContextOverflowError as exc:  # the threads' work is done: never lose it
            emit(
                "notice",
                text=f"apr: the results did not fit one merge request ({exc}); they are "
                "given as the threads wrote them",
            )
            answer = concatenate(threads)
        return {"answer": answer, "calls": calls}

    return synthesize


async def _merge(
    client: LLMClient,
    board: RunBoard,
    state: AprState,
    threads: list[ThreadRecord],
    done: list[ThreadRecord],
    calls: list[CallRecord],
    merge: str,
) -> str:
    task, context = state.get("task", ""), render_context(state.get("context") or "")
    plan = plan_of(state)
    if merge == "concat":
        return concatenate(threads)
    if merge == "vote":
        votes = {t["id"]: normalise_answer(final_answer(t["answer"] or "")) for t in done}
        winner, _, _ = majority(votes)
        return final_answer(next(t["answer"] or "" for t in done if t["id"] == winner))
    if merge == "race" and board.winner is not None:
        return next(t["answer"] or "" for t in done if t["id"] == board.winner)
    if merge == "best" and len(done) > 1:
        candidates = [(t["id"], t["goal"], t["answer"] or "") for t in done]
        try:
            choice, completion = await board.guard(
                client.structured(
                    judge_messages(task, context, candidates, system=board.system),
                    Choice,
                    role="synthesizer",
                    budget=board.budget,
                ),
                budget_only=True,
            )
        except StructuredOutputError:  # no pick: the first result stands
            return done[0]["answer"] or ""
        calls.append(call_record(completion, role="judge"))
        picked = [t for t in done if t["id"] == choice.best.strip()]
        return (picked[0] if picked else done[0])["answer"] or ""
    used = {d for s in plan["subtasks"] for d in s["depends_on"]}  # steps others built on
    if (sole := _sole_survivor(threads, done, used)) is not None:
        return sole
    results = [(t["id"], t["goal"], _result_text(t)) for t in threads]
    system = board.system
    if plan.get("pieces"):  # the context does not fit one request: the merge reads results
        # (with no DEAD END to offer: a 1.5B model's merge gave up with one, "no task given")
        context, system = "", shared_system(task, "", dead_end=False)
    answer = await _merge_calls(client, board, task, context, results, calls, system=system)
    if not answer:
        # An empty merge must not erase finished work: fall back to the results themselves.
        return concatenate(threads)
    # A merge must not lose a part a thread answered (small models drop parts): add back each
    # finished result (not steps others built on) it left out. A short answer with no number
    # or name is looked for by its words, once the merge is seen to keep other parts.
    parts = [t for t in done if t["id"] not in used]
    kept = {t["id"]: kept_in(t["answer"] or "", answer) for t in parts}
    keeps_parts = any(kept.values())
    for t in parts:
        if kept[t["id"]] is None and keeps_parts:
            kept[t["id"]] = words_in(t["answer"] or "", answer)
    lost = [t for t in parts if kept[t["id"]] is False]
    if lost:
        emit("merge_incomplete", lost=[t["id"] for t in lost])
        answer += "\n\n" + concatenate(lost)
    return answer


MERGE_ROUNDS = 4
"""How deep results too long for one merge request are halved, each half merged apart."""


async def _merge_calls(
    client: LLMClient,
    board: RunBoard,
    task: str,
    context: str,
    results: list[tuple[str, str, str]],
    calls: list[CallRecord],
    *,
    system: str | None,
    part: bool = False,
    depth: int = 0,
) -> str:
    """The merge of ``results`` (id, goal, text) by one call, streamed as the answer unless
    it is a ``part``. When the server refuses it as too long, each half of the results is
    merged apart (the same way, at most ``MERGE_ROUNDS`` deep), then the two merges are.

    Raises:
        ContextOverflowError: one result, or a group at the deepest round, does not fit.
    """
    messages = synthesizer_messages(task, context, results, system=system, part=part)
    stream = None if part else answer_emitter()
    try:
        completion = await board.guard(
            client.chat(
                messages,
                role="synthesizer",
                budget=board.budget,
                progress=StreamProgress(on_text=stream),
            ),
            budget_only=True,
        )
    except ContextOverflowError:
        if depth >= MERGE_ROUNDS or len(results) < 2:
            raise
        if depth == 0:
            emit(
                "notice",
                text=f"apr: the {len(results)} results did not fit one merge request: "
                "merging them in groups first",
            )

        def merge(group: list[tuple[str, str, str]], as_part: bool) -> Awaitable[str]:
            return _merge_calls(
                client, board, task, context, group, calls,
                system=system, part=as_part, depth=depth + 1,
            )  # fmt: skip

        half = len(results) // 2
        groups = [results[:half], results[half:]]
        halves = [asyncio.ensure_future(merge(group, True)) for group in groups]
        try:
            merged = await asyncio.gather(*halves)
        except BaseException:  # one half failed or the run stopped: the other goes too
            for half_task in halves:
                half_task.cancel()
            raise
        ids = [f"{g[0][0]}-{g[-1][0]}" if len(g) > 1 else g[0][0] for g in groups]
        return await merge(
            [(i, f"the results of {i}", text) for i, text in zip(ids, merged, strict=True)], part
        )
    calls.append(call_record(completion, role="synthesizer"))
    return completion.text.strip()
