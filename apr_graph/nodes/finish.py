"""The finish node: computes the run's metrics from its call and thread records."""

from __future__ import annotations

import time
from typing import Any

from apr_graph.state import AprState

__all__ = ["compute_metrics", "finish"]


def compute_metrics(state: AprState, now: float) -> dict[str, Any]:
    """Wall time, calls, tokens and the critical path of a finished run.

    Critical-path tokens = planner completion tokens + the longest thread's completion
    tokens + synthesizer completion tokens: the tokens a user waits for in sequence.
    """
    calls = state.get("calls") or []
    threads = state.get("threads") or []
    started = state.get("started_at") or now

    def completion_tokens(role: str) -> int:
        return sum(c["completion_tokens"] for c in calls if c["role"] == role)

    cached = [c["cached_tokens"] for c in calls if c["cached_tokens"] is not None]
    longest_thread = max((t["completion_tokens"] for t in threads), default=0)
    durations = [t["ended_at"] - t["started_at"] for t in threads]
    span = (
        max(t["ended_at"] for t in threads) - min(t["started_at"] for t in threads)
        if threads
        else 0.0
    )
    prompt = sum(c["prompt_tokens"] for c in calls)
    completion = sum(c["completion_tokens"] for c in calls)
    return {
        "wall_time_s": round(now - started, 4),
        "model_calls": len(calls),
        "http_requests": sum(c["requests"] for c in calls),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": sum(cached) if cached else None,
        "critical_path_tokens": completion_tokens("planner")
        + longest_thread
        + completion_tokens("synthesizer"),
        "threads": len(threads),
        "threads_failed": sum(1 for t in threads if t["status"] == "failed"),
        "thread_time_sum_s": round(sum(durations), 4),
        "thread_span_s": round(span, 4),
        "parallel_saved_s": round(max(0.0, sum(durations) - span), 4),
    }


def finish(state: AprState) -> dict[str, Any]:
    """Attach ``metrics`` to the run."""
    return {"metrics": compute_metrics(state, time.time())}
