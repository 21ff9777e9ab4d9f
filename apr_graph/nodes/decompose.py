"""The decompose node: one structured call decides direct answer or parallel subtasks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from apr_graph.errors import InputError, ModelCallError, StructuredOutputError
from apr_graph.events import emit
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.prompts import direct_messages, planner_messages
from apr_graph.settings import AprSettings
from apr_graph.state import AprState, CallRecord, Plan, plan_json_schema

__all__ = ["make_decompose", "normalise_plan"]


def normalise_plan(plan: Plan, max_threads: int) -> dict[str, Any]:
    """Repair a model's plan into something safe to run.

    Subtasks of a direct plan are ignored; subtasks without a goal are dropped; duplicate
    ids are renamed; more than ``max_threads`` subtasks are clamped; a parallel plan left
    with no subtasks becomes direct. ``notes`` says what was changed.
    """
    notes: list[str] = []
    if plan.strategy == "direct":
        if plan.subtasks:
            notes.append(f"ignored {len(plan.subtasks)} subtasks of a direct plan")
        return {
            "strategy": "direct",
            "answer": (plan.answer or "").strip(),
            "subtasks": [],
            "notes": notes,
        }
    subtasks: list[dict[str, str]] = []
    seen: set[str] = set()
    for index, subtask in enumerate(plan.subtasks, start=1):
        goal = subtask.goal.strip()
        if not goal:
            continue
        sid = subtask.id.strip() or f"s{index}"
        if sid in seen:
            sid = f"s{index}"
            while sid in seen:
                sid += "'"
        seen.add(sid)
        subtasks.append({"id": sid, "goal": goal})
    dropped = len(plan.subtasks) - len(subtasks)
    if dropped:
        notes.append(f"dropped {dropped} subtasks without a goal")
    if len(subtasks) > max_threads:
        notes.append(f"clamped {len(subtasks)} subtasks to max_threads={max_threads}")
        subtasks = subtasks[:max_threads]
    if not subtasks:
        notes.append("parallel plan had no subtasks: answering directly")
        return {
            "strategy": "direct",
            "answer": (plan.answer or "").strip(),
            "subtasks": [],
            "notes": notes,
        }
    return {"strategy": "parallel", "answer": None, "subtasks": subtasks, "notes": notes}


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
    client: LLMClient, settings: AprSettings
) -> Callable[[AprState], Awaitable[dict[str, Any]]]:
    """Build the decompose node."""

    async def decompose(state: AprState) -> dict[str, Any]:
        task, context = read_input(state)
        started = time.time()
        calls: list[CallRecord] = []
        messages = planner_messages(task, context, settings.max_threads)
        try:
            plan, completion = await client.structured(
                messages,
                Plan,
                role="planner",
                schema=plan_json_schema(settings.max_threads),
            )
            calls.append(call_record(completion, role="planner"))
            normalised = normalise_plan(plan, settings.max_threads)
        except StructuredOutputError as exc:
            # A model that cannot plan still deserves an answer: fall back to a direct one.
            normalised = {
                "strategy": "direct",
                "answer": "",
                "subtasks": [],
                "notes": [f"no valid plan ({exc.attempts} attempts): answering directly"],
            }
            calls.append(
                CallRecord(
                    role="planner",
                    thread_id=None,
                    model=settings.model_for("planner"),
                    prompt_tokens=exc.prompt_tokens,
                    completion_tokens=exc.completion_tokens,
                    cached_tokens=None,
                    requests=exc.attempts,
                    started_at=started,
                    ended_at=time.time(),
                    mode="failed",
                )
            )
        emit(
            "plan",
            strategy=normalised["strategy"],
            subtasks=normalised["subtasks"],
            notes=normalised["notes"],
        )
        update: dict[str, Any] = {"started_at": started, "plan": normalised, "calls": calls}
        if normalised["strategy"] == "direct":
            answer = normalised["answer"]
            if not answer:
                direct = await client.chat(direct_messages(task, context), role="planner")
                calls.append(call_record(direct, role="planner"))
                answer = direct.text
            if not answer.strip():
                raise ModelCallError(
                    f"the model at {client.base_url} returned an empty answer", url=client.base_url
                )
            update["answer"] = answer
        return update

    return decompose
