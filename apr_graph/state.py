"""Graph state, the records it holds and the reducers that merge parallel updates.

State stays JSON-shaped (dicts, lists, str, numbers) so any checkpointer can store it;
pydantic validates at the edges (the model's plan: ``plan_schema``; the caller's input).
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal, NotRequired

from typing_extensions import TypedDict

__all__ = [
    "AprInput",
    "AprOutput",
    "AprState",
    "CallRecord",
    "Decider",
    "DecisionRecord",
    "ForkInput",
    "LoopRecord",
    "NativeBlock",
    "PlanRecord",
    "PrefixStats",
    "SubtaskRecord",
    "ThreadRecord",
    "WorkerInput",
    "merge_threads",
]


class CallRecord(TypedDict):
    """One model call as seen by the client (after retries and re-asks)."""

    role: str
    thread_id: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None
    requests: int
    started_at: float
    ended_at: float
    mode: str
    first_token_at: NotRequired[float | None]
    finish_reason: NotRequired[str | None]
    """How the reply ended (``loop``: cut where it started repeating itself)."""
    loop_saved_tokens: NotRequired[int]
    """For a reply cut at a loop: the tokens its allowance had left."""


ThreadStatus = Literal["done", "truncated", "failed", "cancelled", "skipped"]


class ThreadRecord(TypedDict):
    """The record of one thread, as returned in the ``threads`` output key.

    ``status``: ``done``; ``truncated`` (cut off by its token limit even after a retry with
    more room: ``answer`` holds what it wrote); ``failed`` (errors, a dead end, or pruned
    after failed verification: a dead end's ``error`` starts with ``dead end:``);
    ``cancelled`` (stopped mid-way: a sibling settled the answer, or a budget ran out;
    ``answer`` holds what it had written, if anything);
    ``skipped`` (never started). Nested threads have ids ``parent/child`` and a ``parent``.
    """

    id: str
    goal: str
    status: ThreadStatus
    answer: str | None
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    critical_path_tokens: int
    started_at: float
    ended_at: float
    depth: int
    parent: str | None
    attempts: int
    verified: bool | None
    looped: NotRequired[LoopRecord]
    """Set when the thread's reply started repeating itself and was cut there (its answer is
    what came before the loop)."""


class LoopRecord(TypedDict):
    """Where a thread's reply started repeating itself."""

    at_tokens: int
    """Tokens of the answer kept (before the loop)."""
    streamed_tokens: int
    """Tokens the reply had streamed when the loop was found and its request closed."""
    period_words: int
    """Words in the repeated block."""
    attempts: int
    """Attempts that looped (a thread that looped gets at most one more)."""
    copied_lines: NotRequired[int]
    """Set when the reply was writing out its input again: the lines it had copied."""


def merge_threads(left: list[ThreadRecord], right: list[ThreadRecord]) -> list[ThreadRecord]:
    """Reducer for ``threads``: a newer record replaces the one with the same id."""
    return list({t["id"]: t for t in [*left, *right]}.values())


class AprInput(TypedDict, total=False):
    """What a caller passes in: the task, and optional context: a string, or named documents
    (name to text, e.g. files; see ``AprSettings.thread_documents``)."""

    task: str
    context: str | dict[str, str]


class ForkInput(AprInput, total=False):
    """The input of a forked thread's run: apr-graph's own, one level deeper."""

    depth: int
    parent_run: str


class SubtaskRecord(TypedDict):
    """One subtask of a repaired plan, as kept in state and sent to its thread."""

    id: str
    goal: str
    depends_on: list[str]
    fork: bool
    max_tokens: int | None
    temperature: NotRequired[float]
    """Sampling temperature of this thread, when it differs from the run's (a repeated goal
    solved again for a vote)."""


class PrefixStats(TypedDict):
    """How much of a fan-out's prompts is one shared prefix, byte for byte."""

    shared_chars: int
    shortest_prompt_chars: int
    shared_fraction: float


class NativeBlock(TypedDict):
    """One parallel block a native reasoner opened."""

    id: str
    depth: int
    outlines: list[str]
    forked: int


Decider = Literal["router", "speed", "chain", "model", "plan", "quality", "review", "length"]
"""What decided a run's strategy (see ``DecisionRecord.by``)."""


class DecisionRecord(TypedDict):
    """Why a run answered directly or forked, as returned in ``plan["decision"]``."""

    choice: Literal["direct", "parallel"]
    by: Decider
    """What decided: ``router`` (the task reads as one piece), ``speed`` (forking was
    predicted not to pay on this endpoint), ``chain`` (the plan's goals form one chain),
    ``model`` (the planner answered directly, or its plan had no parts to run), ``plan`` (the
    plan was run as planned), ``quality`` (``prefer="quality"``: forked whatever the server),
    ``review`` (the plan was edited at review, ``AprSettings.review_plan``), ``length`` (the
    context does not fit one request: a thread per piece)."""
    reason: str
    shape: float | None
    """The router's probability that the answer splits into independent parts."""
    threshold: float | None
    predicted_direct_s: NotRequired[float]
    predicted_parallel_s: NotRequired[float]
    speed_source: NotRequired[str]
    """Where the endpoint's speed profile came from (calibration, earlier runs)."""


class PlanRecord(TypedDict):
    """The plan a run followed, as returned in the ``plan`` output key.

    ``strategy``: ``direct`` (one answer, no threads), ``parallel`` (the subtasks ran as
    threads and were merged by ``merge``) or ``native`` (a model trained to fork wrote its own
    parallel blocks: ``format``, ``blocks``, ``reasoning``, ``critical_path_tokens``).
    ``notes`` says what was repaired in the model's plan; ``working``, in a direct plan, the
    model's working before its answer.
    """

    strategy: Literal["direct", "parallel", "native"]
    answer: str | None
    subtasks: list[SubtaskRecord]
    merge: str | None
    notes: list[str]
    working: NotRequired[str]
    prefix: NotRequired[PrefixStats]
    format: NotRequired[str]
    blocks: NotRequired[list[NativeBlock]]
    reasoning: NotRequired[str]
    critical_path_tokens: NotRequired[int]
    decision: NotRequired[DecisionRecord]
    """Why the run answered directly or forked (``apr_graph.decide``)."""
    pieces: NotRequired[int]
    """The context was too long for one request, and was read in this many pieces, a thread
    each (``inputs.split_context``); the merge reads their results only."""
    review: NotRequired[Literal["pending", "approved", "edited"]]
    """Where a plan held for review (``AprSettings.review_plan``) is: waiting for its
    ``Command(resume=...)``, approved as it was, or edited."""


class AprOutput(TypedDict, total=False):
    """What a run returns."""

    answer: str
    plan: PlanRecord
    threads: list[ThreadRecord]
    metrics: dict[str, Any]
    calls: list[CallRecord]


class AprState(TypedDict, total=False):
    """The full graph state (input, output and the bookkeeping in between)."""

    task: str
    context: str | dict[str, str]
    answer: str
    plan: PlanRecord
    threads: Annotated[list[ThreadRecord], merge_threads]
    metrics: dict[str, Any]
    calls: Annotated[list[CallRecord], operator.add]
    started_at: float
    capacity: dict[str, Any]
    run_id: str
    depth: int
    parent_run: str
    waiting: Annotated[list[str], operator.add]
    """Ids of threads that deferred (a dependency was not running beside them); the join
    sends them again."""


class WorkerInput(TypedDict):
    """The payload of one ``Send`` to the worker node: the plan's merge and width, not the
    plan (a checkpointer stores every payload: N plans would grow as N squared)."""

    task: str
    context: str | dict[str, str]
    """The run's context; the worker node gives the thread its part (``thread_context``)."""
    merge: str
    width: int
    """Threads in the fan-out."""
    subtask: SubtaskRecord
    run_id: str
    depth: int
    documents: NotRequired[list[str]]
    """The context documents this thread was given, when its goal names some (not all)."""
    piece: NotRequired[bool]
    """The thread reads a piece of a context too long for one request (``PlanRecord.pieces``):
    its part can always be done, so it is not offered DEAD END."""
    dependencies: NotRequired[list[ThreadRecord]]
    """Results of the subtask's dependencies, when the join sends a deferred thread again."""
