"""The decompose node: one structured call decides direct answer or parallel subtasks."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from langgraph.types import Overwrite

from apr_graph.board import Boards, RunBoard
from apr_graph.budget import Budget, StoppedError
from apr_graph.decide import after_plan, before_plan, probe_streams
from apr_graph.errors import (
    BudgetExhaustedError,
    ContextOverflowError,
    ModelCallError,
    StructuredOutputError,
)
from apr_graph.events import emit, emit_plan
from apr_graph.inputs import (
    Pieces,
    document_plan,
    each_document,
    pieces_plan,
    planner_view,
    prefix_stats,
    read_input,
    render_context,
    split_context,
)
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record, failed_record
from apr_graph.nodes.direct import direct_answer
from apr_graph.nodes.early import EarlyStarter
from apr_graph.nodes.goal_call import goal_call
from apr_graph.nodes.speed_probe import SpeedProbes
from apr_graph.plan import (
    direct_plan,
    normalise_plan,
    plan_labels,
    repair_dependencies,
    within_slots,
)
from apr_graph.plan_schema import Plan, plan_json_schema
from apr_graph.prompts import planner_messages, shared_system
from apr_graph.router import Shape
from apr_graph.settings import AprSettings
from apr_graph.speed import SpeedProfile, SpeedStore
from apr_graph.speed_store import profile_key, run_speed_store
from apr_graph.state import AprState, CallRecord, PlanRecord, SubtaskRecord

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

__all__ = ["make_decompose", "normalise_plan", "read_input", "repair_dependencies"]


def make_decompose(
    client: LLMClient,
    boards: Boards,
    *,
    speed: SpeedStore,
    start_early: bool = True,
    tools: Sequence[BaseTool] = (),
) -> Callable[[AprState, AprSettings], Awaitable[dict[str, Any]]]:
    """Build the decompose node (given each run's settings); ``speed``: the speed profiles the
    fork decision weighs; ``start_early``: threads may start while the plan streams (with
    ``settings.stream_plan``); ``tools``: the threads' tools, which the planner is told of
    and a direct answer may call."""
    listed = [(t.name, (t.description or "").strip().split("\n")[0][:200]) for t in tools]
    probes = SpeedProbes()

    async def decompose(state: AprState, settings: AprSettings) -> dict[str, Any]:
        task, context = read_input(state)
        depth = int(state.get("depth") or 0)
        board = boards.open(settings, state.get("parent_run"), "synthesize")
        try:
            given = state.get("context") or ""
            run = _Run(client.for_run(settings), settings, task, context, given, depth, board, [])
            return await plan_run(run)
        except BaseException:  # failed or cancelled: the run is over, its board goes too
            boards.close(board.run_id, root=depth == 0)
            raise

    async def plan_run(run: _Run) -> dict[str, Any]:
        client, settings, task = run.client, run.settings, run.task
        depth, board, given = run.depth, run.board, run.given
        started = time.time()
        capacity = await client.capacity_report()
        limit = capacity["limit"]
        if capacity["width"] is None and depth == 0 and settings.probe_capacity:
            emit(
                "notice",
                text=f"apr: {client.base_url} does not report how many requests it runs at "
                f"once; sending up to {limit} at a time (set max_concurrency to change it)",
            )
        endpoint = profile_key(settings, client.base_url)
        here = run_speed_store(speed, settings)  # the graph's LangGraph store, if any
        profile = await here.aget(endpoint) if settings.prefer == "speed" else None
        free = settings.max_total_threads - board.budget.threads_started  # siblings hold some
        measure = functools.partial(
            probes.profile, client, settings, here, endpoint, budget=board.budget, calls=run.calls
        )
        slot = capacity.get("slot_context")

        async def follow(run: _Run, split: Pieces | None) -> dict[str, Any]:
            task, context, given = run.task, run.context, run.given
            if split is not None:  # one call cannot read it all: a thread per piece
                given = split.documents
                run = dataclasses.replace(run, given=given, context=render_context(given))
                context, merge = run.context, settings.merge or "synthesize"
                board.system = shared_system(task, "", merge=merge)  # the merge reads results
                normalised = within_slots(pieces_plan(split, merge, slot), set(), board.budget)
            else:
                normalised = await choose(run, free, limit, profile, measure)
            if normalised["strategy"] == "parallel":
                if settings.review_plan and depth == 0:  # the checkpoint says so on resume
                    normalised["review"] = "pending"
                board.merge = normalised["merge"] or "synthesize"
                board.width = len(normalised["subtasks"])
                normalised["prefix"] = prefix_stats(
                    task,
                    context,
                    normalised,
                    board.system or shared_system(task, context),  # set with the plan
                    given,
                    settings.thread_documents,
                    tools=bool(tools),
                )
            emit_plan(normalised, depth)
            update: dict[str, Any] = {
                "started_at": started,
                "plan": normalised,
                # A run starts its records afresh: a LangGraph thread (a conversation) may
                # hold an earlier run's threads, calls and deferrals, which are not this run's.
                "calls": Overwrite(run.calls),
                "threads": Overwrite([]),
                "waiting": Overwrite([]),
                "capacity": capacity,
                **({"context": given} if split else {}),  # the pieces the threads read
                "run_id": board.run_id,
                "depth": depth,
            }
            if normalised["strategy"] == "direct":
                update["answer"] = await direct_answer(
                    client, settings, board, normalised, task, context, run.calls, tools=tools
                )
            return update

        def pieces(refused: int | None) -> Pieces | None:
            if depth:
                return None
            return split_context(
                task, given, settings, slot_context=slot, slots=free, refused=refused
            )

        split = pieces(refused=None)
        try:
            return await follow(run, split)
        except ContextOverflowError as exc:  # the server refused what the estimate let through
            if split is not None or (split := pieces(refused=exc.requested_tokens or 0)) is None:
                raise
            return await follow(run, split)

    async def choose(
        run: _Run,
        free: int,
        limit: int,
        profile: SpeedProfile | None,
        measure: Callable[[int], Awaitable[SpeedProfile | None]],
    ) -> PlanRecord:
        """Direct or parallel: by a document map, the router and speed, or the planner."""
        settings, given = run.settings, run.given
        mapped = document_plan(run.task, given, settings, slots=free, tools=bool(tools))
        goals = each_document(run.task, given) if mapped is None else [s["goal"] for s in mapped]
        decide = functools.partial(
            before_plan,
            run.task,
            run.context,
            settings,
            width=limit,
            depth=run.depth,
            given=given,
            goals=goals,
            planning=mapped is None,
            tools=bool(tools),
        )
        decision, shape = decide(profile)
        # A fork to weigh (or known parts the router would otherwise decide) on an endpoint
        # whose speed with threads at once is unknown: measure it first.
        streams = probe_streams(
            run.task, settings, profile, limit, run.depth, goals, tools=bool(tools)
        )
        if streams and (decision is None or goals is not None):
            profile = await measure(streams)
            decision, shape = decide(profile)
        if decision is not None:
            normalised = direct_plan("", [])
            normalised["decision"] = decision
            return normalised
        width = limit if settings.probe_capacity else None
        if mapped is not None:
            return mapped_plan(run, mapped, limit, profile, shape)
        return await run_planner(run, width, limit, profile, shape)

    def mapped_plan(
        run: _Run,
        subtasks: list[SubtaskRecord],
        limit: int,
        profile: SpeedProfile | None,
        shape: Shape | None,
    ) -> PlanRecord:
        """The plan of a task that maps over its documents (``inputs.document_plan``), made
        without a planning call, and decided on as a model's plan would be."""
        merge = run.settings.merge or "concat"
        notes = ["planned without a model call: each labelled part names one document"]
        plan = PlanRecord(
            strategy="parallel", answer=None, subtasks=subtasks, merge=merge, notes=notes
        )
        decision = after_plan(
            plan, run.task, run.context, run.settings, profile, shape, width=limit, given=run.given
        )
        if decision["choice"] == "direct":
            plan = direct_plan("", [*notes, f"answering directly: {decision['reason']}"])
        else:
            run.board.system = shared_system(run.task, run.context, merge=merge)
            plan = within_slots(plan, set(), run.board.budget)
        plan["decision"] = decision
        return plan

    async def run_planner(
        run: _Run,
        width: int | None,
        limit: int,
        profile: SpeedProfile | None,
        shape: Shape | None,
    ) -> PlanRecord:
        """The model's plan, repaired, decided on and given its thread slots. ``width``: the
        server's width the planner is told (``None``: not probed); ``limit``: requests in
        flight the decision counts on."""
        client, settings, task, context = run.client, run.settings, run.task, run.context
        depth, board, calls = run.depth, run.board, run.calls
        started = time.time()
        budget = board.budget
        labels = plan_labels(task, settings, bool(listed))
        view, partial = planner_view(run.given, settings.planner_document_chars)
        # Documents shown cut: the schema (no answer field) keeps the planner from answering.
        messages = planner_messages(task, view, settings.max_threads, width, listed, labels)

        @functools.cache
        def system_for(merge: str | None, own: str | None = None) -> str:
            """The threads' shared system message; ``own``: a thread's own documents."""
            return shared_system(
                task, context if own is None else own, tools=bool(tools), merge=merge
            )

        board.system = system_for(None)  # the merge is not known yet: what a warm-up warms
        # A plan to be reviewed sends nothing more before it is approved.
        ahead = not (settings.review_plan and depth == 0)
        # The threads' shared prefix does not depend on the plan: warm it while planning.
        warm = asyncio.ensure_future(_warm(run)) if settings.warm_prefix and ahead else None
        starter = EarlyStarter(
            client,
            settings,
            early=board.early,
            system=system_for,
            task=task,
            context=run.given,
            depth=depth,
            budget=budget,
            after=warm,
        )
        try:
            plan, completion = await board.guard(
                client.structured(
                    messages,
                    Plan,
                    role="planner",
                    schema=plan_json_schema(settings.max_threads, labels, answer=not partial),
                    budget=budget,
                    progress=starter.progress
                    if start_early and settings.stream_plan and ahead
                    else None,
                )
            )
            calls.append(call_record(completion, role="planner"))
            normalised = normalise_plan(
                plan, settings, depth=depth, slots=starter.slots(), task=task
            )
            if partial and normalised["strategy"] == "direct":
                normalised["answer"] = ""  # written without the documents: one call that reads them
            decision = after_plan(
                normalised,
                task,
                context,
                settings,
                profile,
                shape,
                width=limit,
                spent_s=time.time() - started,
                given=run.given,
                tool_goals=sum(
                    goal_call(s["goal"], tools) is not None for s in normalised["subtasks"]
                ),
            )
            if decision["choice"] == "direct" and normalised["strategy"] == "parallel":
                normalised = direct_plan(
                    "", [*normalised["notes"], f"answering directly: {decision['reason']}"]
                )
            normalised["decision"] = decision
        except StructuredOutputError as exc:
            # A model that cannot plan still deserves an answer: fall back to a direct one.
            normalised = direct_plan(
                "", [f"no valid plan ({exc.attempts} attempts): answering directly"]
            )
            model = settings.model_for("planner")
            calls.append(failed_record(exc, role="planner", model=model, started=started))
        except (StoppedError, BudgetExhaustedError):
            reason = budget.stop_reason or "budget"
            normalised = direct_plan("", [f"stopped while planning: {reason}"])
            normalised["answer"] = f"(incomplete: the {reason} was reached while planning)"
        except BaseException:  # failed or cancelled: nothing of this run may go on
            if warm is not None:
                warm.cancel()
            raise
        finally:
            starter.closed = True
        if normalised["strategy"] == "parallel":
            board.system = system_for(normalised["merge"])
        held = starter.settle(normalised, board.system, calls)
        planned = {s["id"] for s in normalised["subtasks"]}
        normalised = within_slots(normalised, held, budget)
        # Early threads the final plan has no place for are closed here (the others are
        # closed by their worker node); a thread started is always finished or cancelled.
        kept = {s["id"] for s in normalised["subtasks"]}
        for dropped in board.drop_early(kept):
            sid = dropped.subtask["id"]
            emit(
                "thread_cancelled",
                id=sid,
                reason=_dropped_reason(sid in planned, budget, settings, normalised),
                completion_tokens=dropped.progress.completion_tokens,
                depth=depth + 1,
            )
        if warm is not None:
            await warm
        return normalised

    return decompose


@dataclass(frozen=True)
class _Run:
    """One run's planning: its client and settings, task, depth, board and call records."""

    client: LLMClient
    settings: AprSettings
    task: str
    context: str
    given: str | Mapping[str, str]
    """The context as the input gave it (documents are split among threads)."""
    depth: int
    board: RunBoard
    calls: list[CallRecord]


def _dropped_reason(planned: bool, budget: Budget, settings: AprSettings, plan: PlanRecord) -> str:
    """Why a thread started early was cancelled before its worker node ran."""
    decision = plan.get("decision")
    if decision is not None and plan["strategy"] == "direct" and decision["by"] != "model":
        return f"answering directly: {decision['reason']}"
    if planned:
        return f"no thread slot left (max_total_threads={settings.max_total_threads})"
    if budget.stop_reason:
        return f"the run stopped while planning ({budget.stop_reason})"
    return "the final plan has no place for it"


async def _warm(run: _Run) -> None:
    """One tiny request with the shared prefix, so the server's cache holds it in time."""
    board = run.board
    messages = [
        {"role": "system", "content": board.system or shared_system(run.task, run.context)},
        {"role": "user", "content": "Reply with OK."},
    ]
    try:
        warm = await board.guard(
            run.client.chat(messages, role="warmup", max_tokens=1, budget=board.budget)
        )
    except (StoppedError, BudgetExhaustedError, ModelCallError):
        return  # a warm-up is an optimisation; the threads run either way
    run.calls.append(call_record(warm, role="warmup"))
