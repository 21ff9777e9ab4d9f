"""Plan repair: a model's plan made safe to run, whatever a small model wrote."""

from __future__ import annotations

import functools
import graphlib
import re
from collections.abc import Mapping
from typing import Any

from apr_graph.budget import Budget
from apr_graph.plan_schema import Plan, Subtask
from apr_graph.settings import AprSettings
from apr_graph.state import PlanRecord, SubtaskRecord

__all__ = [
    "PlanPrefix",
    "direct_plan",
    "is_phrase",
    "labelled_parts",
    "normalise_plan",
    "part_markers",
    "plan_labels",
    "plan_of",
    "repair_dependencies",
    "within_slots",
]


def repair_dependencies(subtasks: list[SubtaskRecord], notes: list[str]) -> None:
    """Drop unknown and self references; a cycle makes the whole plan run in order."""
    ids = [s["id"] for s in subtasks]
    known = set(ids)
    for subtask in subtasks:
        wanted = subtask["depends_on"]
        kept = [d for d in dict.fromkeys(wanted) if d in known and d != subtask["id"]]
        dropped = sorted(set(wanted) - set(kept))
        if dropped:  # a repeated id is merged quietly: nothing was lost
            notes.append(f"{subtask['id']}: ignored unknown or self dependencies {dropped}")
        subtask["depends_on"] = kept
    try:
        graphlib.TopologicalSorter({s["id"]: s["depends_on"] for s in subtasks}).prepare()
    except graphlib.CycleError:
        notes.append("dependencies form a cycle: running the subtasks one after another")
        for index, subtask in enumerate(subtasks):
            subtask["depends_on"] = [ids[index - 1]] if index else []


_MARKER = re.compile(r"(?:^|(?<=[\s:;,]))\(?([a-z]|\d{1,2})\)(?=\s)|(?:^|(?<=\s))(\d{1,2})\.(?=\s)")
_REFERENCE = re.compile(
    r"(?:(?:answer|solve|do|complete|compute|address|handle)\s+)?"
    r"(?:(?:the\s+)?(?:part|question|item|point|step|task)\s+)?"
    r"\(?([a-z]|\d{1,2})\)?\s*[.:]?",
    re.I,
)


def labelled_parts(task: str) -> dict[str, str]:
    """The task's labelled parts, ``{"a": "text of (a)", ...}``, if it lists them.

    Labels are ``(a)``, ``a)``, ``(1)``, ``1)`` or ``1.``, in order from the first (``a`` or
    ``1``) without gaps; anything else is not a list of parts and gives ``{}``.
    """
    return dict(_parts(task))


def part_markers(task: str) -> tuple[tuple[int, int], ...]:
    """Where the labels of ``labelled_parts`` stand in the task: ``(start, end)`` of each."""
    return tuple((start, end) for start, end, _ in _markers(task))


@functools.lru_cache(maxsize=64)
def _markers(task: str) -> tuple[tuple[int, int, str], ...]:
    # Cached: plan repair runs again on every piece of a streamed plan.
    chain: list[tuple[int, int, str]] = []
    expected = None  # the next label, once the first ("a" or "1") was found
    for match in _MARKER.finditer(task):
        label = (match.group(1) or match.group(2)).lower()
        if label != expected and (expected is not None or label not in {"a", "1"}):
            continue
        expected = str(int(label) + 1) if label.isdigit() else chr(ord(label) + 1)
        chain.append((match.start(), match.end(), label))
    return tuple(chain) if len(chain) >= 2 else ()


@functools.lru_cache(maxsize=64)
def _parts(task: str) -> tuple[tuple[str, str], ...]:
    chain = _markers(task)
    if not chain:
        return ()
    stops = [start for start, _, _ in chain[1:]] + [len(task)]
    ends = zip(chain, stops, strict=True)
    parts = {label: task[end:stop].strip() for (_, end, label), stop in ends}
    # "(b) dataset.py (c) sample.py. Give the findings for each file.": after parts that are
    # phrases, a sentence after the last one is the task's closing instruction, not a part.
    *first, last = parts
    if all(is_phrase(parts[label]) for label in first):
        parts[last] = _SENTENCE_END.split(parts[last], maxsplit=1)[0].strip()
    return tuple(parts.items())


def is_phrase(text: str) -> bool:
    """No sentence in it, nor one ending it: "calculator.py", "quicksort", "Lisbon,"."""
    return not _SENTENCE_END.search(text) and not text.rstrip().endswith((".", "?", "!", ":"))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _expand_references(subtasks: list[SubtaskRecord], task: str, notes: list[str]) -> None:
    """A goal that only names a labelled part of the task ("answer (b)") gets its text."""
    parts = labelled_parts(task)
    expanded = []
    for subtask in subtasks:
        matched = _REFERENCE.fullmatch(subtask["goal"].strip()) if parts else None
        if matched and parts.get(label := matched.group(1).lower()):
            subtask["goal"] = f"({label}) {parts[label]}"
            expanded.append(subtask["id"])
    if expanded:
        notes.append(f"goals that only named a part of the task were given its text: {expanded}")


def normalise_plan(
    plan: Plan,
    settings: AprSettings,
    *,
    depth: int = 0,
    slots: int | None = None,
    task: str = "",
) -> PlanRecord:
    """Repair a model's plan into something safe to run.

    Subtasks of a direct plan are ignored; subtasks without a goal are dropped; duplicate
    ids are renamed; a goal that only names a labelled part of ``task`` gets that part's
    text; more than ``max_threads`` (or the run's remaining ``slots``) subtasks are
    clamped; dependencies are repaired; ``fork`` is cleared at the depth limit; thread token
    allowances are kept within bounds; a parallel plan left with no subtasks becomes direct.
    ``notes`` says what was changed.
    """
    notes: list[str] = []
    merge = settings.merge or plan.merge or "synthesize"
    if plan.strategy == "direct":
        if plan.subtasks:
            notes.append(f"ignored {len(plan.subtasks)} subtasks of a direct plan")
        record = direct_plan(plan.answer, notes)
        if plan.working and plan.working.strip():
            record["working"] = plan.working.strip()
        return record
    seen: set[str] = set()
    subtasks = [
        repaired
        for index, subtask in enumerate(plan.subtasks, start=1)
        if (repaired := _subtask_record(index, subtask, seen, settings)) is not None
    ]
    dropped = len(plan.subtasks) - len(subtasks)
    if dropped:
        notes.append(f"dropped {dropped} subtasks without a goal")
    _expand_references(subtasks, task, notes)
    subtasks, merge = _repeated_goals(subtasks, merge, settings, notes)
    limit = settings.max_threads if slots is None else min(settings.max_threads, slots)
    if len(subtasks) > limit:
        which = "max_threads" if limit == settings.max_threads else "max_total_threads"
        notes.append(f"clamped {len(subtasks)} subtasks to {limit} ({which})")
        subtasks = subtasks[:limit]
    if not subtasks:
        notes.append("parallel plan had no subtasks: answering directly")
        return direct_plan(plan.answer, notes)
    repair_dependencies(subtasks, notes)
    if depth + 1 >= settings.max_depth and any(s["fork"] for s in subtasks):
        notes.append(f"max_depth={settings.max_depth} reached: subtasks will not fork again")
        for entry in subtasks:
            entry["fork"] = False
    return PlanRecord(strategy="parallel", answer=None, subtasks=subtasks, merge=merge, notes=notes)


def _subtask_record(
    index: int, subtask: Subtask, seen: set[str], settings: AprSettings
) -> SubtaskRecord | None:
    """The ``index``-th subtask of a plan (from 1), its id made unique among ``seen`` (which
    it joins) and its allowance kept within bounds; ``None`` if it has no goal."""
    goal = subtask.goal.strip()
    if not goal:
        return None
    sid = subtask.id.strip().replace("/", "-") or f"s{index}"
    if sid in seen:
        sid = f"s{index}"
        while sid in seen:
            sid += "'"
    seen.add(sid)
    allowance = subtask.max_tokens
    if allowance is not None:
        allowance = max(settings.min_thread_tokens, min(allowance, settings.worker_max_tokens))
    return SubtaskRecord(
        id=sid,
        goal=goal,
        depends_on=list(subtask.depends_on),
        fork=bool(subtask.fork),
        max_tokens=allowance,
    )


class PlanPrefix:
    """The repair of a plan that is still being written, as ``normalise_plan`` would repair
    the plan written so far, done in time proportional to what is new.

    While the plan is plain (distinct goals, no dependencies), a subtask's repair depends
    only on the subtasks before it, so each is repaired once, as it arrives. A dependency or
    a repeated goal can change subtasks written earlier: from the first one on, the whole
    plan so far is repaired again on every call.
    """

    def __init__(self, settings: AprSettings, *, depth: int, task: str) -> None:
        self.settings = settings
        self.depth = depth
        self.task = task
        self._written: list[Subtask] = []
        self._records: list[SubtaskRecord] = []
        self._ids: set[str] = set()
        self._goals: set[str] = set()
        self._plain = True

    def extend(self, merge: str, new: list[Subtask], *, slots: int) -> PlanRecord:
        """The plan so far, repaired, after ``new`` subtasks were written (``merge``: the
        plan's, never ``None``; ``slots``: threads the run may still start)."""
        before = len(self._written)
        self._written.extend(new)
        limit = min(self.settings.max_threads, slots)
        for index, subtask in enumerate(new if self._plain else (), start=before + 1):
            record = _subtask_record(index, subtask, self._ids, self.settings)
            if record is None:
                continue  # no goal: dropped
            _expand_references([record], self.task, [])
            key = _goal_key(record["goal"])
            if subtask.depends_on or key in self._goals:
                self._plain = False
                break
            self._goals.add(key)
            if len(self._records) < limit:  # past it: clamped
                record["fork"] = record["fork"] and self.depth + 1 < self.settings.max_depth
                self._records.append(record)
        if self._plain:
            return PlanRecord(
                strategy="parallel", answer=None, subtasks=self._records, merge=merge, notes=[]
            )
        plan = Plan(strategy="parallel", merge=merge, subtasks=list(self._written))
        return normalise_plan(plan, self.settings, depth=self.depth, slots=slots, task=self.task)


_APPROACHES = (
    "solve it another way than the most direct one, then check the result",
    "work backwards from what is asked, or check the candidates one by one",
    "estimate first, then work it out exactly and compare with the estimate",
)
"""Approach hints for repeated attempts at one goal, so that they do not all write the same
answer (at temperature 0, or with one seed)."""


def _goal_key(goal: str) -> str:
    return " ".join(goal.lower().split()).rstrip(".")


def _repeated_goals(
    subtasks: list[SubtaskRecord], merge: str, settings: AprSettings, notes: list[str]
) -> tuple[list[SubtaskRecord], str]:
    """Subtasks that repeat a goal: one goal N times becomes N different attempts at it,
    voted on (not under the model's ``concat``: it meant parts, and wrote none); a goal
    repeated among others is solved once (its repeats are dropped and dependencies on them
    point at the one kept)."""
    groups: dict[str, list[SubtaskRecord]] = {}
    for subtask in subtasks:
        groups.setdefault(_goal_key(subtask["goal"]), []).append(subtask)
    if len(groups) == len(subtasks):
        return subtasks, merge
    if len(groups) == 1 and merge == "concat" and settings.merge is None:
        # "concat": the model read the task as separate parts, and wrote none of them.
        notes.append(f"all {len(subtasks)} subtasks repeat one goal under merge concat: not split")
        return [], merge
    if len(groups) == 1:
        count = len(subtasks)
        for index, subtask in enumerate(subtasks[1:], start=1):
            hint = _APPROACHES[(index - 1) % len(_APPROACHES)]
            subtask["goal"] += f" (attempt {index + 1} of {count}: {hint})"
            subtask["temperature"] = settings.vote_temperature
        voted = settings.merge or (merge if merge in {"vote", "race", "best"} else "vote")
        notes.append(f"all {count} subtasks had the same goal: {count} attempts, merge {voted}")
        return subtasks, voted
    first = {key: group[0]["id"] for key, group in groups.items()}
    same = {s["id"]: first[_goal_key(s["goal"])] for s in subtasks}
    kept = [s for s in subtasks if same[s["id"]] == s["id"]]
    for subtask in kept:
        subtask["depends_on"] = [same.get(d, d) for d in subtask["depends_on"]]
    repeats = sorted(set(same) - {s["id"] for s in kept})
    notes.append(f"dropped {repeats}: they repeat the goal of another subtask")
    return kept, merge


def direct_plan(answer: str | None, notes: list[str]) -> PlanRecord:
    """A plan that answers in one call (``answer`` may be empty: then a direct call follows;
    so it is when the answer is a placeholder, as the 135M demo model writes "...")."""
    text = (answer or "").strip()
    if text and _PLACEHOLDER.fullmatch(text):
        notes = [*notes, f"the planner's answer {text!r} says nothing: answering by one call"]
        text = ""
    return PlanRecord(strategy="direct", answer=text, subtasks=[], merge=None, notes=notes)


_PLACEHOLDER = re.compile(r"[.\u2026\u2013\u2014_?\s-]{1,40}")  # dots, ellipsis, dashes


def plan_of(state: Mapping[str, Any]) -> PlanRecord:
    """The plan a run's state holds (an empty direct plan before there is one)."""
    plan: PlanRecord | None = state.get("plan")
    return plan if plan is not None else direct_plan("", [])


def within_slots(plan: PlanRecord, held: set[str], budget: Budget) -> PlanRecord:
    """``plan`` with a thread slot for each subtask (those in ``held`` have theirs); those
    left without one are cut (a sibling fork may have taken slots since the repair)."""
    if plan["strategy"] != "parallel":
        return plan
    wanted = [s for s in plan["subtasks"] if s["id"] not in held]
    granted = budget.reserve_threads(len(wanted))
    if granted == len(wanted):
        return plan
    cut = [s["id"] for s in wanted[granted:]]
    subtasks = [s for s in plan["subtasks"] if s["id"] not in cut]
    notes = [
        *plan["notes"],
        f"clamped {len(plan['subtasks'])} subtasks to {len(subtasks)} (max_total_threads): "
        f"no thread slot left for {cut}",
    ]
    if not subtasks:
        notes.append("parallel plan had no subtasks: answering directly")
        return direct_plan("", notes)
    repair_dependencies(subtasks, notes)
    clamped = plan.copy()
    clamped["subtasks"], clamped["notes"] = subtasks, notes
    return clamped


def plan_labels(task: str, settings: AprSettings, tools: bool) -> list[str]:
    """The labels a parallel plan names its subtasks by, or none (goals written out): none
    with tools (a part is written as its call), nor past ``max_threads`` (parts grouped)."""
    if not settings.label_goals or tools:
        return []
    labels = list(labelled_parts(task))
    return labels if len(labels) <= settings.max_threads else []
