"""Run metrics on their own: ``compute_metrics`` over hand-made call and thread records.
No sockets: the records are built in memory."""

from __future__ import annotations

from typing import Any

import pytest

from apr_graph.nodes.finish import compute_metrics, service_overlap
from apr_graph.state import AprState, CallRecord, ThreadRecord

NOW = 1_000.0


def call(
    role: str,
    completion: int,
    *,
    prompt: int = 0,
    thread: str | None = None,
    cached: int | None = None,
    requests: int = 1,
) -> CallRecord:
    return CallRecord(
        role=role,
        thread_id=thread,
        model="m",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        requests=requests,
        started_at=NOW - 10,
        ended_at=NOW - 9,
        mode="json_schema",
    )


def thread(
    tid: str,
    *,
    status: str = "done",
    start: float = 0.0,
    end: float = 0.0,
    completion: int = 0,
    prompt: int = 0,
    critical: int | None = None,
    parent: str | None = None,
    depth: int = 1,
) -> ThreadRecord:
    record: dict[str, Any] = {
        "id": tid,
        "goal": f"goal of {tid}",
        "status": status,
        "answer": None,
        "error": None,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "critical_path_tokens": completion if critical is None else critical,
        "started_at": start,
        "ended_at": end,
        "depth": depth,
        "parent": parent,
        "attempts": 1,
        "verified": None,
    }
    return ThreadRecord(**record)  # type: ignore[typeddict-item]


def metrics(
    calls: list[CallRecord] | None = None,
    threads: list[ThreadRecord] | None = None,
    started_at: float | None = NOW - 5,
) -> dict[str, Any]:
    state = AprState(calls=calls or [], threads=threads or [])
    if started_at is not None:
        state["started_at"] = started_at
    return compute_metrics(state, NOW)


def test_critical_path_is_planner_plus_longest_thread_plus_merge() -> None:
    result = metrics(
        calls=[
            call("planner", 10),
            call("warmup", 1),
            call("worker", 5, thread="a"),
            call("worker", 30, thread="b"),
            call("planner", 100, thread="b"),  # b's own fork: inside b's critical path
            call("synthesizer", 7),
        ],
        threads=[thread("a", completion=5), thread("b", completion=30, critical=130)],
    )
    assert result["critical_path_tokens"] == 10 + 1 + 130 + 7
    assert result["completion_tokens"] == 10 + 1 + 5 + 30 + 100 + 7  # every call counts here


def test_a_judge_call_is_on_the_critical_path() -> None:
    result = metrics(
        calls=[call("planner", 4), call("judge", 6)], threads=[thread("a", critical=9)]
    )
    assert result["critical_path_tokens"] == 4 + 9 + 6


def test_nested_threads_count_inside_their_parent_not_on_their_own() -> None:
    result = metrics(
        calls=[call("planner", 3), call("synthesizer", 2)],
        threads=[
            thread("a", critical=20),
            thread("b", critical=50),
            thread("b/x", critical=400, parent="b", depth=2),  # already inside b's 50
        ],
    )
    assert result["critical_path_tokens"] == 3 + 50 + 2
    assert result["threads"] == 3
    assert result["max_depth_reached"] == 2


def test_a_direct_answer_is_all_critical_path() -> None:
    result = metrics(calls=[call("planner", 12, prompt=40), call("planner", 8, prompt=50)])
    assert result["critical_path_tokens"] == 20
    assert result["threads"] == 0
    assert result["max_depth_reached"] == 0
    assert result["thread_span_s"] == 0.0
    assert result["thread_time_sum_s"] == 0.0


def test_overlapping_threads_span_less_than_their_sum() -> None:
    result = metrics(
        threads=[
            thread("a", start=10.0, end=12.0),
            thread("b", start=11.0, end=14.0),
            thread("c", start=11.5, end=12.5),
        ]
    )
    assert result["thread_time_sum_s"] == pytest.approx(6.0)
    assert result["thread_span_s"] == pytest.approx(4.0)
    assert result["parallel_saved_s"] == pytest.approx(2.0)


def test_threads_one_after_another_save_nothing() -> None:
    result = metrics(threads=[thread("a", start=0.0, end=1.0), thread("b", start=3.0, end=4.0)])
    assert result["thread_time_sum_s"] == pytest.approx(2.0)
    assert result["thread_span_s"] == pytest.approx(4.0)  # the gap counts in the span
    assert result["parallel_saved_s"] == 0.0  # never negative


def test_nested_threads_are_left_out_of_the_times() -> None:
    result = metrics(
        threads=[
            thread("a", start=10.0, end=12.0),
            thread("a/x", start=10.5, end=30.0, parent="a", depth=2),
        ]
    )
    assert result["thread_time_sum_s"] == pytest.approx(2.0)
    assert result["thread_span_s"] == pytest.approx(2.0)


def test_skipped_threads_are_counted_but_left_out_of_the_times() -> None:
    result = metrics(
        threads=[
            thread("a", start=10.0, end=12.0),
            thread("b", start=11.0, end=13.0),
            thread("never", status="skipped", start=0.0, end=0.0),
        ]
    )
    assert result["thread_span_s"] == pytest.approx(3.0)  # not 13 s back to time 0
    assert result["thread_time_sum_s"] == pytest.approx(4.0)
    assert result["threads"] == 3
    assert result["threads_skipped"] == 1


def test_only_skipped_threads_have_no_span() -> None:
    result = metrics(threads=[thread("a", status="skipped", start=5.0, end=9.0)])
    assert result["thread_span_s"] == 0.0
    assert result["thread_time_sum_s"] == 0.0


def test_cancelled_threads_tokens_are_counted() -> None:
    # A cancelled call leaves no call record: its tokens live only on the thread record.
    result = metrics(
        calls=[call("planner", 10, prompt=100), call("worker", 6, prompt=50, thread="a")],
        threads=[
            thread("a", completion=6, prompt=50, start=1.0, end=2.0),
            thread("b", status="cancelled", completion=12, prompt=40, start=1.0, end=1.5),
            thread("a/x", status="cancelled", completion=3, prompt=9, parent="a", depth=2),
        ],
    )
    assert result["prompt_tokens"] == 100 + 50 + 40  # the nested run counts its own
    assert result["completion_tokens"] == 10 + 6 + 12
    assert result["cancelled_tokens"] == 12 + 3
    assert result["threads_cancelled"] == 2


def test_threads_are_counted_by_status() -> None:
    result = metrics(
        threads=[
            thread("a"),
            thread("b", status="failed"),
            thread("c", status="failed"),
            thread("d", status="cancelled"),
            thread("e", status="skipped"),
        ]
    )
    assert result["threads"] == 5
    assert result["threads_failed"] == 2
    assert result["threads_cancelled"] == 1
    assert result["threads_skipped"] == 1


def test_savings_are_estimated_from_the_median_finished_thread() -> None:
    result = metrics(
        threads=[
            thread("a", completion=10, start=0.0, end=1.0),
            thread("b", completion=30, start=0.0, end=3.0),
            thread("c", completion=20, start=0.0, end=2.0),
            thread("d", status="cancelled", completion=5, start=0.0, end=0.5),
            thread("e", status="cancelled", completion=25, start=0.0, end=2.5),  # past the median
        ]
    )
    assert result["saved_tokens_estimate"] == 20 - 5
    assert result["saved_seconds_estimate"] == pytest.approx(1.5)


def test_no_savings_without_cancellation_and_unknown_without_a_finished_thread() -> None:
    none_cancelled = metrics(threads=[thread("a", completion=10)])
    assert none_cancelled["saved_tokens_estimate"] == 0
    assert none_cancelled["saved_seconds_estimate"] == 0.0
    nothing_finished = metrics(threads=[thread("a", status="cancelled", completion=4)])
    assert nothing_finished["saved_tokens_estimate"] is None
    assert nothing_finished["saved_seconds_estimate"] is None


def test_calls_requests_and_cached_tokens() -> None:
    result = metrics(
        calls=[
            call("planner", 1, requests=3, cached=None),
            call("worker", 1, thread="a", requests=1, cached=8),
            call("worker", 1, thread="b", requests=2, cached=0),
        ]
    )
    assert result["model_calls"] == 3
    assert result["http_requests"] == 6  # retries and re-asks included
    assert result["cached_tokens"] == 8
    assert metrics(calls=[call("planner", 1)])["cached_tokens"] is None  # no server said


def test_wall_time_runs_from_the_start_of_the_run() -> None:
    assert metrics(started_at=NOW - 2.5)["wall_time_s"] == pytest.approx(2.5)
    assert metrics(started_at=None)["wall_time_s"] == 0.0


def test_an_empty_run_is_all_zero() -> None:
    result = metrics()
    assert result["model_calls"] == 0
    assert result["http_requests"] == 0
    assert result["prompt_tokens"] == 0
    assert result["completion_tokens"] == 0
    assert result["critical_path_tokens"] == 0
    assert result["cancelled_tokens"] == 0
    assert result["cached_tokens"] is None
    assert result["saved_tokens_estimate"] == 0  # nothing cancelled, so nothing saved


def generating(tid: str, first_token: float, end: float) -> CallRecord:
    """A thread's call that queued from 0 and generated from ``first_token`` to ``end``."""
    return {
        **call("worker", 10, thread=tid),
        "started_at": 0.0,
        "first_token_at": first_token,
        "ended_at": end,
    }


@pytest.mark.parametrize(
    ("spans", "overlap"),
    [
        ([(0, 10), (0, 10), (0, 10)], 10.0),  # three side by side for 10 s: 10 s, not 20
        ([(0, 10), (5, 15), (8, 20)], 10.0),  # two or more from 5 to 15
        ([(0, 5), (5, 9), (9, 12)], 0.0),  # one after another (touching is not overlap)
    ],
)
def test_the_overlap_is_the_time_two_or_more_threads_generated(
    spans: list[tuple[float, float]], overlap: float
) -> None:
    calls = [generating(f"s{i}", start, end) for i, (start, end) in enumerate(spans, 1)]
    calls.append(generating("s1/s1", 0, 30))  # a nested thread's call is its own run's
    assert service_overlap(calls) == overlap
