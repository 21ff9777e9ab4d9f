"""The run board's guard: what a stop, a settled answer and a caller's cancel do to guarded work.

The guard runs its work in the caller's own task (a wide fan-out holds thousands of guards at
once: no task of its own, no waiter tasks). These tests pin the semantics that change must
keep: a stop cancels the work and raises ``StoppedError``; a caller's cancel stays a cancel;
a settled vote or race leaves the merge step's ``budget_only`` guards alone.
"""

from __future__ import annotations

import asyncio

import pytest

from apr_graph.board import RunBoard
from apr_graph.budget import Budget, StoppedError
from apr_graph.settings import AprSettings


def board(**settings: object) -> RunBoard:
    budget = Budget(AprSettings(base_url="http://127.0.0.1:9/v1", **settings))  # type: ignore[arg-type]
    return RunBoard("run", budget, "race", 2)


class Work:
    """Guarded work that waits until released, and records how it ended."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.ended: str | None = None

    async def __call__(self) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        self.ended = "finished"
        return "result"


async def test_a_budget_stop_cancels_the_work_and_raises_stopped() -> None:
    run, work = board(), Work()
    guarded = asyncio.create_task(run.guard(work()))
    await work.started.wait()
    run.budget.stop("deadline")
    with pytest.raises(StoppedError, match="deadline"):
        await guarded
    assert work.ended == "cancelled"  # its request would be closed, not left running
    assert guarded.cancelling() == 0  # the stop's cancel was taken back: the task goes on


async def test_a_settled_race_cancels_threads_but_not_the_merge_step() -> None:
    run, thread, merge = board(), Work(), Work()
    in_thread = asyncio.create_task(run.guard(thread()))
    in_merge = asyncio.create_task(run.guard(merge(), budget_only=True))
    await asyncio.gather(thread.started.wait(), merge.started.wait())
    run.settle("s1", "race")
    with pytest.raises(StoppedError, match="race"):
        await in_thread
    merge.release.set()
    assert await in_merge == "result"
    assert (thread.ended, merge.ended) == ("cancelled", "finished")


async def test_a_callers_cancel_stays_a_cancel() -> None:
    run, work = board(), Work()
    guarded = asyncio.create_task(run.guard(work()))
    await work.started.wait()
    guarded.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guarded
    assert work.ended == "cancelled"


async def test_a_callers_cancel_at_the_moment_of_a_stop_is_still_a_cancel() -> None:
    run, work = board(), Work()
    guarded = asyncio.create_task(run.guard(work()))
    await work.started.wait()
    run.budget.stop("deadline")
    await asyncio.sleep(0)  # the board's cancel goes out ...
    guarded.cancel()  # ... and the caller's on top of it
    with pytest.raises(asyncio.CancelledError):
        await guarded


async def test_a_stop_from_inside_the_guarded_work_ends_it_at_its_next_wait() -> None:
    run = board(token_budget=10)
    reached: list[str] = []

    async def spends_the_budget() -> str:
        run.budget.charge(10)  # the run's last tokens, charged by the work itself
        reached.append("charged")
        await asyncio.sleep(5)
        reached.append("slept")
        return "too late"

    with pytest.raises(StoppedError, match="token_budget"):
        await asyncio.wait_for(run.guard(spends_the_budget()), 2)
    assert reached == ["charged"]


async def test_an_already_stopped_run_does_not_start_the_work() -> None:
    run, work = board(), Work()
    run.budget.stop("deadline")
    await asyncio.sleep(0)
    with pytest.raises(StoppedError):
        await run.guard(work())
    assert not work.started.is_set()


async def test_finished_work_returns_its_result_and_starts_no_task() -> None:
    run = board()
    tasks_inside: list[int] = []

    async def quick() -> str:
        tasks_inside.append(len(asyncio.all_tasks()))
        return "done"

    before = len(asyncio.all_tasks())
    assert await run.guard(quick()) == "done"
    assert tasks_inside == [before]  # the work ran in this task: no task, no waiters
    run.budget.stop("deadline")  # a stop after the guard ended touches nothing
    await asyncio.sleep(0)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_guard_within_a_guard_raises_stopped_once() -> None:
    run, work = board(), Work()

    async def outer() -> str:
        return await run.guard(work())

    guarded = asyncio.create_task(run.guard(outer()))
    await work.started.wait()
    run.budget.stop("deadline")
    with pytest.raises(StoppedError):
        await guarded
    assert guarded.cancelling() == 0
