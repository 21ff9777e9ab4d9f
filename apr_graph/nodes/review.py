"""The review node: a run may pause once its plan is made, before any thread's request is sent,
for a person or a program to approve or edit the plan (``AprSettings.review_plan``).

It pauses with LangGraph's ``interrupt``, so the run waits in its checkpoint: resume it, in this
process or another, with ``Command(resume=...)``:

- ``True`` (or ``None``): run the plan as it is;
- a list of goals (strings, or subtasks as the plan writes them): run those instead;
- a plan (``{"subtasks": [...], "merge": "concat"}``): run it. An edited plan is repaired as a
  model's is (``plan.normalise_plan``): ids, dependencies, ``max_threads`` and slots.

Any other reply pauses the run again, with the same plan and an ``error`` saying what to send.
"""

from __future__ import annotations

from typing import Any

from langgraph.config import get_config
from langgraph.runtime import Runtime
from langgraph.types import interrupt
from pydantic import ValidationError

from apr_graph.board import Boards
from apr_graph.context import AprContext
from apr_graph.errors import ConfigurationError, InputError
from apr_graph.events import emit_plan
from apr_graph.plan import normalise_plan, plan_of
from apr_graph.plan_schema import Plan
from apr_graph.settings import AprSettings
from apr_graph.state import AprState, DecisionRecord, PlanRecord

__all__ = ["make_review"]

_CHECKPOINTER = "__pregel_checkpointer"  # LangGraph's config key (CONFIG_KEY_CHECKPOINTER)


def make_review(settings: AprSettings, boards: Boards) -> Any:
    """Build the review node, given the graph's settings (a run's context may change them).

    A plain function: ``interrupt`` reads the run's config from the calling context, which a
    sync run would lose on the client's helper loop."""

    def review(state: AprState, runtime: Runtime[Any]) -> dict[str, Any]:
        plan = plan_of(state)
        if plan.get("review") != "pending":  # held by decompose (a resume may not say so)
            return {}
        context = runtime.context
        run = context.apply(settings) if isinstance(context, AprContext) else settings
        # Nothing of the run stays in memory while it waits (it may wait for days, or resume
        # in another process): its threads revive its board, its deadline counts from then.
        boards.close_soon(state.get("run_id", ""))
        if get_config().get("configurable", {}).get(_CHECKPOINTER) is None:
            raise ConfigurationError(
                "review_plan pauses the run in its checkpoint, and this graph has none: "
                "compile it with a checkpointer (compile_apr_graph(checkpointer=...)) and "
                "give the run a thread_id"
            )
        ask: dict[str, Any] = {"task": state.get("task", ""), "plan": plan}
        while True:  # a reply that is no plan asks again, saying why: nothing is lost
            reply = interrupt(ask)
            if reply is None or reply is True:
                return {"plan": {**plan, "review": "approved"}}
            try:
                edited = _edited(reply, plan, run, ask["task"])
                break
            except InputError as exc:
                ask = {**ask, "error": str(exc)}
        emit_plan(edited, 0)
        return {"plan": edited}

    return review


def _edited(reply: Any, plan: PlanRecord, settings: AprSettings, task: str) -> PlanRecord:
    """The plan a review's reply asks for, repaired; ``InputError`` if it is none."""
    if isinstance(reply, list):
        reply = {"subtasks": reply}
    if not isinstance(reply, dict):
        raise InputError(
            f"a plan review was answered with {type(reply).__name__} {reply!r}: resume with "
            "Command(resume=True) to run the plan, or with a list of goals or a plan "
            '({"subtasks": [...], "merge": ...}) to run that instead'
        )
    try:
        model = Plan.model_validate({"strategy": "parallel", "merge": plan["merge"], **reply})
    except ValidationError as exc:
        raise InputError(f"the reviewed plan is not a plan: {exc}") from exc
    edited = normalise_plan(model, settings, slots=settings.max_total_threads, task=task)
    edited["review"] = "edited"
    if plan.get("pieces"):  # still pieces of a context too long for one request
        edited["pieces"] = len(edited["subtasks"])
    if edited["strategy"] != "parallel" or not edited["subtasks"]:
        raise InputError(
            "the reviewed plan has no subtasks: give at least one goal, or resume with True"
        )
    goals, before = len(edited["subtasks"]), plan.get("decision")
    edited["decision"] = DecisionRecord(
        choice="parallel",
        by="review",
        reason=f"edited at review: {goals} goal{'s' if goals > 1 else ''}",
        shape=before["shape"] if before else None,
        threshold=before["threshold"] if before else None,
    )
    return edited
