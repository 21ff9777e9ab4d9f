"""When to fork: on what the task is, and on what forking buys on the server at hand.

Two questions, in this order, each able to answer "direct" before a token is spent on a plan:

1. **Does the task split?** The shipped router (``apr_graph.router``, a logistic regression
   learned from public labelled prompts) reads the task: one continuous piece (a story, a
   role-play, one explanation, one word problem whose steps need each other) is answered by
   one call. A small planner model cannot be trusted with this (a 1.5B model split 79 of 80
   open questions and 8 of 8 single word problems).
2. **Does forking pay here?** With a speed profile of the endpoint (``apr calibrate``, or
   learned from earlier runs' calls), the wall time of one direct call and of a plan (plan +
   threads under the measured concurrency + merge) are predicted, and a plan that loses is
   not run (``prefer="speed"``, the default). On a 2-core CPU server whose 4 slots decode
   1.37x one stream, planning and merging cost more than the threads save; on a GPU server
   batching makes threads nearly free.

After the plan, the same prediction is made with the plan's own width and merge (the
planning call is spent by then, so only what is left is compared), and a plan whose goals
form one chain (each needs the last) is run as one call: a chain has nothing to run at once
(with ``prefer="quality"`` the plan runs as planned, a chain step by step).

The decision goes into ``plan["decision"]`` with its reason and predictions, and the finish
node puts the prediction beside the actual wall time in ``metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from apr_graph.inputs import planner_view, thread_context
from apr_graph.plan import labelled_parts
from apr_graph.router import Shape, task_shape
from apr_graph.settings import AprSettings
from apr_graph.speed import (
    SpeedProfile,
    SpeedStore,
    default_speed_file,
    predict_call_s,
    predict_plan_s,
)
from apr_graph.state import Decider, DecisionRecord, PlanRecord, SubtaskRecord

__all__ = [
    "Estimate",
    "after_plan",
    "before_plan",
    "is_chain",
    "predict",
    "prompt_tokens",
    "speed_store",
]

PART_TOKENS = 200
"""Tokens one part of an answer takes when nothing better is known (a short worked answer of
an instruct model); once runs on an endpoint have finished threads, the length they took
replaces it (``SpeedProfile.part_tokens``, learned by ``SpeedStore.observe``)."""

PARTS_UNLABELLED = 4
"""Parts assumed for a task that splits but does not label its parts."""

MERGE_RATIO = 0.6
"""A synthesized answer's length relative to the parts' (it restates what matters)."""

THREAD_OVERHEAD_TOKENS = 30
"""What a thread writes beyond its part's share (restating its goal)."""

PLAN_TOKENS_PER_PART = 25
"""A plan's tokens per goal, plus ``PLAN_TOKENS_FIXED`` (strategy, merge, JSON)."""

PLAN_TOKENS_FIXED = 20

THREAD_PROMPT_EXTRA = 50
"""A thread's prompt beyond the task and its context (its own goal and message)."""

_CHARS_PER_TOKEN = 4
_SYSTEM_TOKENS = 250
"""The instructions each call carries before the task (planner, thread, merge)."""


@dataclass(frozen=True)
class Estimate:
    """What a task is expected to cost, in tokens."""

    prompt_tokens: int
    parts: int
    part_tokens: int
    thread_prompt_tokens: int | None = None
    """The longest thread's prompt, when threads do not all read the whole context (named
    documents, ``AprSettings.thread_documents``); ``None``: the task's prompt."""
    planner_prompt_tokens: int | None = None
    """The planning call's prompt, when the planner reads only a part of the context (each
    long document's beginning, ``AprSettings.planner_document_chars``); ``None``: the task's
    prompt."""


def thread_prompt_tokens(
    task: str, given: str | Mapping[str, str], goals: list[str], documents: str
) -> int | None:
    """The longest of the threads' prompts for ``goals``, when some thread reads only a part
    of the context's documents; ``None`` when every thread reads it all."""
    own = [thread_context(given, goal, documents) for goal in goals]
    if all(names is None for _, names in own):
        return None
    return max(prompt_tokens(task, text) for text, _ in own) + THREAD_PROMPT_EXTRA


def speed_store(settings: AprSettings) -> SpeedStore:
    """The store of endpoint speeds ``settings.speed_file`` names (``""``: in memory)."""
    if settings.speed_file == "":
        return SpeedStore(None)
    return SpeedStore(Path(settings.speed_file) if settings.speed_file else default_speed_file())


def prompt_tokens(*texts: str) -> int:
    """A rough token count of ``texts`` (4 characters a token), plus a call's instructions."""
    return _SYSTEM_TOKENS + sum(len(t) for t in texts) // _CHARS_PER_TOKEN


def before_plan(
    task: str,
    context: str,
    settings: AprSettings,
    profile: SpeedProfile | None,
    *,
    width: int,
    depth: int,
    given: str | Mapping[str, str] = "",
    planning: bool = True,
) -> tuple[DecisionRecord | None, Shape | None]:
    """A decision to answer directly before any model call, or ``None`` (plan it).

    The router reads top-level tasks only: a forked thread's task is a goal its planner
    marked as worth splitting. ``width``: requests the server runs at once. ``given``: the
    context as the input gave it (a thread that names documents reads those alone).
    ``planning``: a fork would cost a planning call (not for a task whose plan is known
    without one, ``inputs.document_plan``).
    """
    shape = task_shape(task, context) if settings.router and depth == 0 else None
    if shape is not None and not shape.splits:
        why = f" ({', '.join(shape.why)})" if shape.why else ""
        return _record(
            "direct",
            "router",
            f"the task reads as one piece: router {shape.parallel:.2f} < {shape.threshold:.2f}"
            + why,
            shape,
        ), shape
    if settings.prefer == "quality" or profile is None:
        return None, shape
    parts = labelled_parts(task)
    estimate = Estimate(
        prompt_tokens=prompt_tokens(task, context),
        parts=min(len(parts) or PARTS_UNLABELLED, settings.max_threads),
        part_tokens=_part_tokens(profile),
        thread_prompt_tokens=thread_prompt_tokens(
            task, given, list(parts.values()), settings.thread_documents
        ),
        planner_prompt_tokens=_planner_prompt_tokens(task, given, settings) if planning else None,
    )
    # Before the plan its merge is unknown: at best it makes no call (concat). A plan that
    # loses even so is not asked for; one that might win is asked for, and decided on again
    # with its own merge and width (``after_plan``).
    merge = settings.merge or "concat"
    direct_s, parallel_s = predict(profile, estimate, merge=merge, width=width, plan=planning)
    if parallel_s < direct_s:
        return None, shape
    record = _record(
        "direct",
        "speed",
        _slower(profile, estimate.parts, direct_s, parallel_s, width, at_best=True),
        shape,
    )
    _predicted(record, profile, direct_s, parallel_s)
    return record, shape


def after_plan(
    plan: PlanRecord,
    task: str,
    context: str,
    settings: AprSettings,
    profile: SpeedProfile | None,
    shape: Shape | None,
    *,
    width: int,
    spent_s: float = 0.0,
    given: str | Mapping[str, str] = "",
) -> DecisionRecord:
    """The decision once the model has planned: run the plan, or answer with one call.

    ``spent_s``: seconds the run has taken so far (the planning call), added to both
    predictions so that each is of the whole run."""
    if plan["strategy"] != "parallel":
        return _record("direct", "model", "the planner answered directly", shape)
    subtasks = plan["subtasks"]
    if settings.prefer == "quality":
        # A chain run step by step gives each step a short, fresh context: slower, but
        # what a user who prefers quality may want.
        return _record("parallel", "quality", "prefer='quality': forking as planned", shape)
    if is_chain(subtasks):
        return _record(
            "direct",
            "chain",
            f"the plan's {len(subtasks)} goals form one chain (each needs the last): "
            "nothing runs at once",
            shape,
        )
    if profile is None:
        return _record(
            "parallel",
            "plan",
            "no speed profile for this endpoint yet (apr calibrate, or one run of each kind): "
            "forking as planned",
            shape,
        )
    allowance = _part_tokens(profile)
    goals = [s["goal"] for s in subtasks]
    estimate = Estimate(
        prompt_tokens(task, context),
        len(subtasks),
        allowance,
        thread_prompt_tokens(task, given, goals, settings.thread_documents),
    )
    # The planning call is spent: compare what is left of each way.
    direct_s, parallel_s = predict(
        profile, estimate, merge=plan["merge"] or "synthesize", width=width, plan=False
    )
    direct_s, parallel_s = direct_s + spent_s, parallel_s + spent_s
    if parallel_s < direct_s:
        choice: Literal["direct", "parallel"] = "parallel"
        reason = (
            f"{len(subtasks)} threads predicted {direct_s / parallel_s:.2f}x faster than one "
            f"call on this server (~{parallel_s:.1f}s vs ~{direct_s:.1f}s)"
        )
        by: Decider = "plan"
    else:
        choice, by = "direct", "speed"
        reason = _slower(profile, len(subtasks), direct_s, parallel_s, width)
    record = _record(choice, by, reason, shape)
    _predicted(record, profile, direct_s, parallel_s)
    return record


def predict(
    profile: SpeedProfile,
    estimate: Estimate,
    *,
    merge: str,
    width: int,
    plan: bool,
) -> tuple[float, float]:
    """Predicted seconds of one direct call and of the fan-out (with its planning call when
    ``plan``), for a task of ``estimate``."""
    parts, part = estimate.parts, estimate.part_tokens
    answer = parts * part
    direct_s = predict_call_s(profile, prompt_tokens=estimate.prompt_tokens, output_tokens=answer)
    merge_tokens = 0 if merge in {"concat", "race", "vote"} else math.ceil(answer * MERGE_RATIO)
    parallel_s = predict_plan_s(
        profile,
        prompt_tokens=(estimate.planner_prompt_tokens or estimate.prompt_tokens) if plan else 0,
        plan_tokens=PLAN_TOKENS_FIXED + PLAN_TOKENS_PER_PART * parts if plan else 0,
        thread_prompt_tokens=estimate.thread_prompt_tokens
        or estimate.prompt_tokens + THREAD_PROMPT_EXTRA,
        thread_tokens=[part + THREAD_OVERHEAD_TOKENS] * parts,
        width=max(1, min(width, parts)),
        merge_prompt_tokens=estimate.prompt_tokens + answer,
        merge_tokens=merge_tokens,
    )
    return direct_s, parallel_s


def is_chain(subtasks: list[SubtaskRecord]) -> bool:
    """Whether two or more goals form one chain: no two of them can run at the same time."""
    if len(subtasks) < 2:
        return False
    depends = {s["id"]: set(s["depends_on"]) for s in subtasks}
    level: dict[str, int] = {}

    def depth_of(sid: str, seen: frozenset[str] = frozenset()) -> int:
        if sid not in level:
            parents = [d for d in depends.get(sid, ()) if d in depends and d not in seen]
            level[sid] = 1 + max((depth_of(d, seen | {sid}) for d in parents), default=0)
        return level[sid]

    return max(depth_of(s["id"]) for s in subtasks) == len(subtasks)


def _slower(
    profile: SpeedProfile,
    parts: int,
    direct_s: float,
    parallel_s: float,
    width: int,
    *,
    at_best: bool = False,
) -> str:
    streams = max(1, min(width, parts))
    best = " at best" if at_best else ""
    return (
        f"forking would not pay on this server: ~{direct_s:.1f}s as one call vs "
        f"~{parallel_s:.1f}s{best} as {parts} threads ({streams} at once decode "
        f"{profile.gain(streams):.2f}x one stream)"
    )


def _planner_prompt_tokens(
    task: str, given: str | Mapping[str, str], settings: AprSettings
) -> int | None:
    """The planning call's prompt when the planner reads a part of the documents, else
    ``None`` (it reads what a direct answer reads)."""
    view, partial = planner_view(given, settings.planner_document_chars)
    return prompt_tokens(task, view) if partial else None


def _part_tokens(profile: SpeedProfile) -> int:
    """Tokens one thread's answer takes: learned on this endpoint, else ``PART_TOKENS``."""
    return round(profile.part_tokens) if profile.part_tokens else PART_TOKENS


def _record(
    choice: Literal["direct", "parallel"], by: Decider, reason: str, shape: Shape | None
) -> DecisionRecord:
    return DecisionRecord(
        choice=choice,
        by=by,
        reason=reason,
        shape=round(shape.parallel, 3) if shape else None,
        threshold=round(shape.threshold, 3) if shape else None,
    )


def _predicted(
    record: DecisionRecord, profile: SpeedProfile, direct_s: float, parallel_s: float
) -> None:
    record["predicted_direct_s"] = round(direct_s, 2)
    record["predicted_parallel_s"] = round(parallel_s, 2)
    record["speed_source"] = profile.source
