"""The finish node: computes the run's metrics from its call and thread records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from statistics import median_high
from typing import Any

from apr_graph.board import Boards
from apr_graph.budget import EXHAUSTED
from apr_graph.inputs import without_tags
from apr_graph.llm import LLMClient
from apr_graph.plan import plan_of
from apr_graph.responses import LOOPED
from apr_graph.settings import AprSettings
from apr_graph.speed import SpeedStore
from apr_graph.speed_store import profile_key, run_speed_store
from apr_graph.state import AprState, CallRecord, DecisionRecord, ThreadRecord

__all__ = ["compute_metrics", "decision_metrics", "make_finish"]


def estimate_saved(cancelled: list[ThreadRecord], done: list[ThreadRecord]) -> dict[str, Any]:
    """What cancelling threads saved, estimated from the threads that finished."""
    if not cancelled:
        return {"saved_tokens_estimate": 0, "saved_seconds_estimate": 0.0}
    if not done:
        return {"saved_tokens_estimate": None, "saved_seconds_estimate": None}
    tokens = median_high(t["completion_tokens"] for t in done)
    seconds = median_high(t["ended_at"] - t["started_at"] for t in done)
    return {
        "saved_tokens_estimate": sum(max(0, tokens - t["completion_tokens"]) for t in cancelled),
        "saved_seconds_estimate": round(
            sum(max(0.0, seconds - (t["ended_at"] - t["started_at"])) for t in cancelled), 3
        ),
    }


def service_overlap(calls: list[CallRecord]) -> float:
    """Seconds during which two or more top-level threads were generating (first token to
    end, so queueing does not count): 0 means the server ran them one at a time."""
    edges = sorted(
        edge
        for c in calls
        if c["role"] == "worker" and c["thread_id"] is not None and "/" not in c["thread_id"]
        for edge in ((c.get("first_token_at") or c["started_at"], 1), (c["ended_at"], -1))
    )
    overlap, active, last = 0.0, 0, 0.0
    for at, step in edges:  # at one instant an end comes before a start: touching is not overlap
        if active >= 2:
            overlap += at - last
        active, last = active + step, at
    return round(overlap, 4)


def compute_metrics(state: AprState, now: float) -> dict[str, Any]:
    """Wall time, calls, tokens, the critical path and what coordination did. Critical-path
    tokens (waited for in sequence) = planner + longest top-level thread's + merge call's."""
    calls = state.get("calls") or []
    threads = state.get("threads") or []
    own = [t for t in threads if t.get("parent") is None]
    started = state.get("started_at") or now

    def own_tokens(*roles: str) -> int:
        return sum(
            c["completion_tokens"] for c in calls if c["role"] in roles and c["thread_id"] is None
        )

    cached = [c["cached_tokens"] for c in calls if c["cached_tokens"] is not None]
    durations = [t["ended_at"] - t["started_at"] for t in own if t["status"] != "skipped"]
    ran = [t for t in own if t["status"] != "skipped"]
    span = max(t["ended_at"] for t in ran) - min(t["started_at"] for t in ran) if ran else 0.0
    cancelled = [t for t in threads if t["status"] == "cancelled"]
    paid = [*calls, *(t for t in cancelled if t["parent"] is None)]
    prompt = sum(c["prompt_tokens"] for c in paid)
    completion = sum(c["completion_tokens"] for c in paid)
    done = [t for t in threads if t["status"] == "done"]
    return {
        "wall_time_s": round(now - started, 4),
        "model_calls": len(calls),
        "http_requests": sum(c["requests"] for c in calls),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": sum(cached) if cached else None,
        "critical_path_tokens": own_tokens("planner", "warmup")
        + max((t["critical_path_tokens"] for t in own), default=0)
        + own_tokens("synthesizer", "judge"),
        "threads": len(threads),
        "threads_failed": sum(1 for t in threads if t["status"] == "failed"),
        "threads_cancelled": len(cancelled),
        "threads_skipped": sum(1 for t in threads if t["status"] == "skipped"),
        "cancelled_tokens": sum(t["completion_tokens"] for t in cancelled),
        **estimate_saved(cancelled, done),
        "max_depth_reached": max((t["depth"] for t in threads), default=0),
        "thread_time_sum_s": round(sum(durations), 4),
        "thread_span_s": round(span, 4),
        "parallel_saved_s": round(max(0.0, sum(durations) - span), 4),
        "service_overlap_s": service_overlap(calls),
        "loops": sum(1 for c in calls if c.get("finish_reason") == LOOPED),
        "loop_saved_tokens": sum(c.get("loop_saved_tokens", 0) for c in calls),
    }


def decision_metrics(decision: DecisionRecord) -> dict[str, Any]:
    """The run's decision, and its predicted wall time beside the actual one."""
    other = "parallel" if decision["choice"] == "direct" else "direct"
    return {
        "decision": decision["choice"],
        "decided_by": decision["by"],
        "predicted_wall_s": decision.get(f"predicted_{decision['choice']}_s"),
        "predicted_other_s": decision.get(f"predicted_{other}_s"),
    }


def make_finish(
    client: LLMClient, boards: Boards, speed: SpeedStore
) -> Callable[[AprState, AprSettings], Awaitable[dict[str, Any]]]:
    """Build the finish node: metrics (the decision's prediction beside the actual), what
    the run's calls say of the endpoint's speed, then forget the run's live board."""

    async def finish(state: AprState, settings: AprSettings) -> dict[str, Any]:
        metrics = compute_metrics(state, time.time())
        run_id = state.get("run_id", "")
        board = boards.get(run_id)
        own = [t for t in state.get("threads") or [] if t.get("parent") is None]
        plan = plan_of(state)
        metrics["merge"] = plan["merge"]
        metrics["capacity"] = state.get("capacity")
        if plan["strategy"] == "native":  # a native run measures its own chain
            metrics["critical_path_tokens"] = plan.get("critical_path_tokens", 0)
        prefix = plan.get("prefix")
        metrics["shared_prefix_fraction"] = prefix["shared_fraction"] if prefix else None
        prompt, cached = metrics["prompt_tokens"], metrics["cached_tokens"]
        metrics["cache_hit_fraction"] = round(cached / prompt, 4) if cached and prompt else None
        if board is not None:
            reason = board.stop_reason
            metrics["stop_reason"] = reason
            metrics["winner"] = board.winner
            metrics["budget_tokens_used"] = board.budget.tokens_used
            missing = [t["id"] for t in own if t["status"] != "done"]
            exhausted = reason in EXHAUSTED
            metrics["incomplete"] = exhausted and (bool(missing) or not own)
            metrics["missing"] = missing if exhausted else []
            if board.merge == "vote":
                metrics["votes"] = dict(board.votes)
            boards.close(run_id, root=not state.get("depth"))
        decision = plan.get("decision")
        if decision is not None:
            metrics.update(decision_metrics(decision))
        if settings.learn_speed and not state.get("depth"):
            endpoint = profile_key(settings, client.base_url)
            # A small file written with fsync: in a worker thread, not on the loop where
            # other runs' threads are streaming.
            here = run_speed_store(speed, settings)  # the graph's LangGraph store, if any
            calls = [c for c in state.get("calls") or [] if c["role"] != "probe"]  # learned
            await asyncio.to_thread(here.observe, endpoint, calls)
        update: dict[str, Any] = {"metrics": metrics}
        answer = state.get("answer")
        if (
            isinstance(answer, str)
            and (bare := without_tags(answer, state.get("context"))) != answer
        ):
            update["answer"] = bare
        return update

    return finish
