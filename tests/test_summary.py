"""What the summary claims about parallelism: only real overlap of generation counts."""

from __future__ import annotations

from typing import Any

import pytest

from apr_graph.cli_view import summary_line
from apr_graph.nodes.finish import service_overlap
from apr_graph.state import CallRecord


def call(thread: str | None, sent: float, first: float | None, end: float) -> CallRecord:
    return CallRecord(
        role="worker" if thread else "planner",
        thread_id=thread,
        model="m",
        prompt_tokens=1,
        completion_tokens=1,
        cached_tokens=None,
        requests=1,
        started_at=sent,
        ended_at=end,
        mode="text",
        first_token_at=first,
    )


def test_threads_queued_behind_one_slot_overlap_not_at_all() -> None:
    # All three were sent at once; the server served them one after another.
    calls = [call("s1", 0.0, 0.1, 1.0), call("s2", 0.0, 1.1, 2.0), call("s3", 0.0, 2.1, 3.0)]
    assert service_overlap(calls) == 0.0


def test_generation_that_runs_side_by_side_counts() -> None:
    calls = [call("s1", 0.0, 0.0, 2.0), call("s2", 0.0, 0.5, 2.5), call("s3", 0.0, 3.0, 4.0)]
    # s1 and s2 generated together from 0.5 to 2.0.
    assert service_overlap(calls) == pytest.approx(1.5)


def test_planner_and_nested_calls_are_not_threads_of_this_run() -> None:
    calls = [call(None, 0.0, 0.0, 5.0), call("s1", 0.0, 0.0, 2.0), call("s1/a", 0.0, 0.0, 2.0)]
    assert service_overlap(calls) == 0.0


def test_a_call_without_a_first_token_counts_from_when_it_was_sent() -> None:
    calls = [call("s1", 0.0, None, 2.0), call("s2", 1.0, None, 3.0)]
    assert service_overlap(calls) == pytest.approx(1.0)


METRICS: dict[str, Any] = {
    "wall_time_s": 3.0,
    "model_calls": 4,
    "total_tokens": 100,
    "prompt_tokens": 80,
    "completion_tokens": 20,
    "critical_path_tokens": 10,
    "thread_span_s": 3.0,
}


def test_summary_says_when_the_server_ran_threads_one_at_a_time() -> None:
    line = summary_line({**METRICS, "threads": 3, "service_overlap_s": 0.0})
    assert "one at a time" in line
    assert "saved" not in line


def test_summary_reports_real_overlap() -> None:
    line = summary_line({**METRICS, "threads": 3, "service_overlap_s": 1.5})
    assert "3 threads, two or more generating at once for 1.50s (span 3.00s)" in line
