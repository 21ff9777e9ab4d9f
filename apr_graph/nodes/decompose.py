"""The decompose node: one structured call decides direct answer or parallel subtasks."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from apr_graph.coordination import Boards, RunBoard, StoppedError
from apr_graph.errors import (
    BudgetExhaustedError,
    InputError,
    ModelCallError,
    StructuredOutputError,
)
from apr_graph.events import emit
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.prompts import direct_messages, planner_messages, shared_system, worker_messages
from apr_graph.settings import AprSettings
from apr_graph.state import AprState, CallRecord, Plan, plan_json_schema

__all__ = ["make_decompose", "normalise_plan", "repair_dependencies"]


def repair_dependencies(subtasks: list[dict[str, Any]], notes: list[str]) -> None:
    """Drop unknown and self references; a cycle makes the whole plan run in order."""
    ids = [s["id"] for s in subtasks]
    known = set(ids)
    for subtask in subtasks:
        wanted = subtask["depends_on"]
        kept = [d for d in dict.fromkeys(wanted) if d in known and d != subtask["id"]]
        if len(kept) != len(wanted):
            dropped = sorted(set(wanted) - set(kept))
            notes.append(f"{subtask['id']}: ignored unknown or self dependencies {dropped}")
        subtask["depends_on"] = kept
    if _has_cycle(subtasks):
        notes.append("dependencies form a cycle: running the subtasks one after another")
        for index, subtask in enumerate(subtasks):
            subtask["depends_on"] = [ids[index - 1]] if index else []


def _has_cycle(subtasks: list[dict[str, Any]]) -> bool:
    edges = {s["id"]: s["depends_on"] for s in subtasks}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str) -> bool:
        if state.get(node) == 1:
            return True
        if state.get(node) == 2:
            return False
        state[node] = 1
        if any(visit(n) for n in edges.get(node, [])):
            return True
        state[node] = 2
        return False

    return any(visit(n) for n in edges)


def normalise_plan(
    plan: Plan, settings: AprSettings, *, depth: int = 0, slots: int | None = None
) -> dict[str, Any]:
    """Repair a model's plan into something safe to run.

    Subtasks of a direct plan are ignored; subtasks without a goal are dropped; duplicate
    ids are renamed; more than ``max_threads`` (or the run's remaining ``slots``) subtasks are
    clamped; dependencies are repaired; ``fork`` is cleared at the depth limit; thread token
    allowances are kept within bounds; a parallel plan left with no subtasks becomes direct.
    ``notes`` says what was changed.
    """
    notes: list[str] = []
    merge = settings.merge or plan.merge or "synthesize"
    if plan.strategy == "direct":
        if plan.subtasks:
            notes.append(f"ignored {len(plan.subtasks)} subtasks of a direct plan")
        return _direct(plan.answer, notes)
    subtasks: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, subtask in enumerate(plan.subtasks, start=1):
        goal = subtask.goal.strip()
        if not goal:
            continue
        sid = subtask.id.strip().replace("/", "-") or f"s{index}"
        if sid in seen:
            sid = f"s{index}"
            while sid in seen:
                sid += "'"
        seen.add(sid)
        allowance = subtask.max_tokens
        if allowance is not None:
            allowance = max(settings.min_thread_tokens, min(allowance, settings.worker_max_tokens))
        subtasks.append(
            {"id": sid, "goal": goal, "depends_on": list(subtask.depends_on),
             "fork": bool(subtask.fork), "max_tokens": allowance}
        )  # fmt: skip
    dropped = len(plan.subtasks) - len(subtasks)
    if dropped:
        notes.append(f"dropped {dropped} subtasks without a goal")
    limit = settings.max_threads if slots is None else min(settings.max_threads, slots)
    if len(subtasks) > limit:
        which = "max_threads" if limit == settings.max_threads else "max_total_threads"
        notes.append(f"clamped {len(subtasks)} subtasks to {limit} ({which})")
        subtasks = subtasks[:limit]
    if not subtasks:
        notes.append("parallel plan had no subtasks: answering directly")
        return _direct(plan.answer, notes)
    repair_dependencies(subtasks, notes)
    if depth + 1 >= settings.max_depth and any(s["fork"] for s in subtasks):
        notes.append(f"max_depth={settings.max_depth} reached: subtasks will not fork again")
        for entry in subtasks:
            entry["fork"] = False
    return {"strategy": "parallel", "answer": None, "subtasks": subtasks, "merge": merge,
            "notes": notes}  # fmt: skip


def _direct(answer: str | None, notes: list[str]) -> dict[str, Any]:
    return {"strategy": "direct", "answer": (answer or "").strip(), "subtasks": [],
            "merge": None, "notes": notes}  # fmt: skip


def read_input(state: AprState) -> tuple[str, str]:
    """The validated task and context of the graph input."""
    task = state.get("task")
    if not isinstance(task, str) or not task.strip():
        raise InputError(
            f"the graph input needs a non-empty 'task' string, got {task!r}: "
            "invoke it with {'task': 'your question'}"
        )
    context = state.get("context") or ""
    if not isinstance(context, str):
        raise InputError(f"'context' must be a string, got {type(context).__name__}")
    return task.strip(), context


def make_decompose(
    client: LLMClient, settings: AprSettings, boards: Boards
) -> Callable[[AprState], Awaitable[dict[str, Any]]]:
    """Build the decompose node."""

    async def decompose(state: AprState) -> dict[str, Any]:
        task, context = read_input(state)
        depth = int(state.get("depth") or 0)
        parent_run = state.get("parent_run")
        started = time.time()
        budget = boards.budget_for(settings, parent_run)
        board = RunBoard(uuid.uuid4().hex, budget, "synthesize", [])
        boards.attach(board)
        calls: list[CallRecord] = []
        width = await client.capacity() if settings.probe_capacity else None
        messages = planner_messages(task, context, settings.max_threads, width)
        try:
            plan, completion = await board.guard(
                client.structured(
                    messages,
                    Plan,
                    role="planner",
                    schema=plan_json_schema(settings.max_threads),
                    budget=budget,
                )
            )
            calls.append(call_record(completion, role="planner"))
            slots = settings.max_total_threads - budget.threads_started
            normalised = normalise_plan(plan, settings, depth=depth, slots=slots)
        except StructuredOutputError as exc:
            # A model that cannot plan still deserves an answer: fall back to a direct one.
            normalised = _direct(
                "", [f"no valid plan ({exc.attempts} attempts): answering directly"]
            )
            calls.append(
                CallRecord(role="planner", thread_id=None, model=settings.model_for("planner"),
                           prompt_tokens=exc.prompt_tokens,
                           completion_tokens=exc.completion_tokens, cached_tokens=None,
                           requests=exc.attempts, started_at=started, ended_at=time.time(),
                           mode="failed")
            )  # fmt: skip
        except (StoppedError, BudgetExhaustedError):
            reason = budget.stop_reason or "budget"
            normalised = _direct("", [f"stopped while planning: {reason}"])
            normalised["answer"] = f"(incomplete: the {reason} was reached while planning)"
        if normalised["strategy"] == "parallel":
            budget.reserve_threads(len(normalised["subtasks"]))
            board.merge = normalised["merge"]
            board.thread_ids = [s["id"] for s in normalised["subtasks"]]
            normalised["prefix"] = prefix_stats(task, context, normalised)
            if settings.warm_prefix:
                await _warm(client, board, task, context, normalised, calls)
        emit("plan", strategy=normalised["strategy"], subtasks=normalised["subtasks"],
             notes=normalised["notes"], merge=normalised["merge"], depth=depth)  # fmt: skip
        update: dict[str, Any] = {
            "started_at": started, "plan": normalised, "calls": calls, "run_id": board.run_id,
            "depth": depth,
        }  # fmt: skip
        if normalised["strategy"] == "direct":
            update["answer"] = await _direct_answer(client, board, normalised, task, context, calls)
        return update

    return decompose


def prefix_stats(task: str, context: str, plan: dict[str, Any]) -> dict[str, Any]:
    """How much of the fan-out's prompts is one shared prefix, byte for byte."""
    prompts = [
        json.dumps(worker_messages(task, context, plan, subtask), ensure_ascii=False).encode()
        for subtask in plan["subtasks"]
    ]
    shared = len(os.path.commonprefix(prompts))  # noqa: RUF071 - a byte-level prefix is the point
    shortest = min(len(p) for p in prompts)
    return {"shared_chars": shared, "shortest_prompt_chars": shortest,
            "shared_fraction": round(shared / shortest, 4) if shortest else 0.0}  # fmt: skip


async def _warm(
    client: LLMClient,
    board: RunBoard,
    task: str,
    context: str,
    plan: dict[str, Any],
    calls: list[CallRecord],
) -> None:
    """One tiny request with the shared prefix, so the server's cache holds it in time."""
    messages = [
        {"role": "system", "content": shared_system(task, context, plan)},
        {"role": "user", "content": "Reply with OK."},
    ]
    try:
        warm = await board.guard(
            client.chat(messages, role="warmup", max_tokens=1, budget=board.budget)
        )
    except (StoppedError, BudgetExhaustedError, ModelCallError):
        return  # a warm-up is an optimisation; the threads run either way
    calls.append(call_record(warm, role="warmup"))


async def _direct_answer(
    client: LLMClient,
    board: RunBoard,
    plan: dict[str, Any],
    task: str,
    context: str,
    calls: list[CallRecord],
) -> str:
    answer: str = plan["answer"]
    if not answer:
        try:
            direct = await board.guard(
                client.chat(direct_messages(task, context), role="planner", budget=board.budget)
            )
        except (StoppedError, BudgetExhaustedError) as stop:
            reason = board.budget.stop_reason or getattr(stop, "reason", "budget")
            return f"(incomplete: the {reason} was reached before an answer)"
        calls.append(call_record(direct, role="planner"))
        answer = direct.text
    if not answer.strip():
        raise ModelCallError(
            f"the model at {client.base_url} returned an empty answer", url=client.base_url
        )
    return answer
