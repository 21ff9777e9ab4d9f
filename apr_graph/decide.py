"""When to fork: on what the task is, and on what forking buys on the server at hand.

Before the plan, a task the router (``apr_graph.router``) reads as one continuous piece is
answered by one call, and so is one whose fan-out (plan + threads under the measured
concurrency + merge) a speed profile of the endpoint (``apr calibrate``, learned from
earlier runs, or measured just before: ``probe_streams``) predicts slower than one direct
call. After the plan, a plan whose goals form one chain runs as one call, and the prediction
is made again with the plan's own width and merge. With ``prefer="quality"`` the plan runs
as planned. The decision goes into ``plan["decision"]`` with its reason and predictions.
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
    "probe_streams",
    "prompt_tokens",
    "speed_store",
]

PART_TOKENS = 200
"""Tokens one part of an answer takes until runs on the endpoint have measured it
(``SpeedProfile.part_tokens``)."""

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
_SYSTEM_TOKENS = 250  # the instructions each call carries before the task


@dataclass(frozen=True)
class Estimate:
    """What a task is expected to cost, in tokens."""

    prompt_tokens: int
    parts: int
    part_tokens: int
    thread_prompt_tokens: int | None = None
    """The longest thread's prompt, when threads do not all read the whole context
    (``AprSettings.thread_documents``); ``None``: the task's prompt."""
    planner_prompt_tokens: int | None = None
    """The planning call's prompt, when the planner reads only a part of the context
    (``AprSettings.planner_document_chars``); ``None``: the task's prompt."""


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
    goals: list[str] | None = None,
    planning: bool = True,
    tools: bool = False,
) -> tuple[DecisionRecord | None, Shape | None]:
    """A decision to answer directly before any model call, or ``None`` (plan it).

    The router reads top-level tasks only (``depth == 0``), and none with ``tools``: it
    reads the answer's shape, not the lookups a task needs ("How many bolts, nuts and
    gears are in stock?" reads as one piece), which the planner, told of the tools, can
    write as goals run without the model. A task whose parts are known (``goals``: its
    documents, when it asks something of each of them) is decided on speed instead, once the
    endpoint's profile can compare (or with ``prefer="quality"``): the router reads words,
    and there the documents are the parts. Until then (the decompose node measures the
    endpoint first, unless ``probe_speed`` is off) the router decides, as a first run on a
    slow server would otherwise pay for a fork. ``planning``: a fork would cost a planning
    call (not for ``inputs.document_plan``). ``width``: requests the server runs at once.
    ``given``: the context as the input gave it.
    """
    known = settings.prefer == "quality" or (profile is not None and _measured(profile, width))
    routed = settings.router and depth == 0 and not tools and (goals is None or not known)
    shape = task_shape(task, context) if routed else None
    if shape is not None and not shape.splits:
        why = f" ({', '.join(shape.why)})" if shape.why else ""
        reason = f"the task reads as one piece: router {shape.parallel:.2f} < {shape.threshold:.2f}"
        return _record("direct", "router", reason + why, shape), shape
    if settings.prefer == "quality" or profile is None or not _measured(profile, width):
        return None, shape
    if tools:  # its goals may be tool calls, run without the model: the plan will say
        return None, shape
    goals, parts = _fork_parts(task, goals, settings)
    view, partial = planner_view(given, settings.planner_document_chars)
    estimate = Estimate(
        prompt_tokens=prompt_tokens(task, context),
        parts=parts,
        part_tokens=_part_tokens(profile),
        thread_prompt_tokens=thread_prompt_tokens(task, given, goals, settings.thread_documents),
        planner_prompt_tokens=prompt_tokens(task, view) if planning and partial else None,
    )
    # The merge is unknown yet: at best it makes no call (concat); ``after_plan`` decides again.
    merge = settings.merge or "concat"
    record = _by_speed(
        profile, estimate, shape, merge=merge, width=width, plan=planning, at_best=True
    )
    return (None if record["choice"] == "parallel" else record), shape


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
    tool_goals: int = 0,
) -> DecisionRecord:
    """The decision once the model has planned: run the plan, or answer with one call.

    ``spent_s``: seconds the run has taken so far (the planning call), added to both
    predictions so that each is of the whole run. ``tool_goals``: goals written as calls of
    the threads' tools, run without the model."""
    if plan["strategy"] != "parallel":  # the planner's choice, or its plan had no parts
        why = "; ".join(plan["notes"]) or "the planner answered directly"
        return _record("direct", "model", why, shape)
    subtasks = plan["subtasks"]
    if settings.prefer == "quality":
        return _record("parallel", "quality", "prefer='quality': forking as planned", shape)
    if subtasks and tool_goals == len(subtasks):
        why = f"its {len(subtasks)} goals are tool calls, run without the model"
        return _record("parallel", "plan", why, shape)
    if is_chain(subtasks):
        return _record(
            "direct",
            "chain",
            f"the plan's {len(subtasks)} goals form one chain (each needs the last): "
            "nothing runs at once",
            shape,
        )
    if profile is None or not _measured(profile, width):
        lacks = (
            "no speed profile for this endpoint yet (apr calibrate, or one run of each kind)"
            if profile is None
            else "no figure yet for threads at once on this endpoint (apr calibrate, or "
            "this run's threads)"
        )
        return _record("parallel", "plan", f"{lacks}: forking as planned", shape)
    goals = [s["goal"] for s in subtasks]
    thread = thread_prompt_tokens(task, given, goals, settings.thread_documents)
    estimate = Estimate(prompt_tokens(task, context), len(subtasks), _part_tokens(profile), thread)
    # The planning call is spent: compare what is left of each way.
    merge = plan["merge"] or "synthesize"
    return _by_speed(
        profile, estimate, shape, merge=merge, width=width, plan=False, spent_s=spent_s
    )


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


def _by_speed(
    profile: SpeedProfile,
    estimate: Estimate,
    shape: Shape | None,
    *,
    merge: str,
    width: int,
    plan: bool,
    spent_s: float = 0.0,
    at_best: bool = False,
) -> DecisionRecord:
    """Fork when the fan-out is predicted faster than one call. ``spent_s``: seconds the run
    took so far, added to both predictions; ``at_best``: the prediction is a lower bound."""
    direct_s, parallel_s = predict(profile, estimate, merge=merge, width=width, plan=plan)
    direct_s, parallel_s = direct_s + spent_s, parallel_s + spent_s
    parts, streams = estimate.parts, max(1, min(width, estimate.parts))
    faster = parallel_s < direct_s
    if faster:
        reason = (
            f"{parts} threads predicted {direct_s / parallel_s:.2f}x faster than one "
            f"call on this server (~{parallel_s:.1f}s vs ~{direct_s:.1f}s)"
        )
    else:
        reason = (
            f"forking would not pay on this server: ~{direct_s:.1f}s as one call vs "
            f"~{parallel_s:.1f}s{' at best' if at_best else ''} as {parts} threads "
            f"({streams} at once decode {profile.gain(streams):.2f}x one stream)"
        )
    record = _record(
        "parallel" if faster else "direct", "plan" if faster else "speed", reason, shape
    )
    record["predicted_direct_s"] = round(direct_s, 2)
    record["predicted_parallel_s"] = round(parallel_s, 2)
    record["speed_source"] = profile.source
    return record


def _measured(profile: SpeedProfile, width: int) -> bool:
    """Whether the profile can compare a fan-out with one call. One stream's rate (all that
    runs answered directly teach) says nothing of what threads at once decode: read as "no
    gain", it would keep the endpoint from ever forking, and so from ever learning it."""
    return width <= 1 or max(profile.decode_tps) > 1


def probe_streams(
    task: str,
    settings: AprSettings,
    profile: SpeedProfile | None,
    width: int,
    depth: int,
    goals: list[str] | None,
    *,
    tools: bool = False,
) -> int:
    """How many streams at once to measure before deciding on ``task`` (0: no measure:
    the profile can compare, or the run does not decide on speed, nor before its plan, as
    with ``tools``): as many as its parts would run at once."""
    if not settings.probe_speed or settings.prefer != "speed" or depth or tools:
        return 0
    if profile is not None and _measured(profile, width):
        return 0
    streams = min(width, _fork_parts(task, goals, settings)[1])
    return streams if streams > 1 else 0


def _fork_parts(task: str, goals: list[str] | None, settings: AprSettings) -> tuple[list[str], int]:
    """The goals a fork of ``task`` is costed by (``goals`` if known, else its labelled
    parts), and how many threads it would run (``PARTS_UNLABELLED`` without any)."""
    known = list(labelled_parts(task).values()) if goals is None else goals
    return known, min(len(known) or PARTS_UNLABELLED, settings.max_threads)


def _part_tokens(profile: SpeedProfile) -> int:
    """Tokens one thread's answer takes: learned on this endpoint, else ``PART_TOKENS``."""
    return round(profile.part_tokens) if profile.part_tokens else PART_TOKENS


def _record(
    choice: Literal["direct", "parallel"],
    by: Decider,
    reason: str,
    shape: Shape | None,
) -> DecisionRecord:
    return DecisionRecord(
        choice=choice,
        by=by,
        reason=reason,
        shape=round(shape.parallel, 3) if shape else None,
        threshold=round(shape.threshold, 3) if shape else None,
    )
