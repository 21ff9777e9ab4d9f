"""Where the threads of one run meet: dependencies, early stop, cancellation.

A ``RunBoard`` is live coordination only (asyncio objects, kept out of graph state): a
dependent thread awaits its siblings' results there, and a settled vote or race cancels the
others. A resumed run gets a fresh board and reads results from the checkpoint via the join.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from apr_graph.answers import majority, normalise_answer
from apr_graph.budget import Budget, StoppedError
from apr_graph.settings import AprSettings
from apr_graph.state import CallRecord, ThreadRecord

if TYPE_CHECKING:
    from apr_graph.nodes.early import EarlyCall

__all__ = ["DEFERRED", "Boards", "RunBoard", "deferred_record"]

T = TypeVar("T")

DEFERRED = "deferred: a dependency runs in a later step"
"""The ``error`` of the stand-in record a deferred thread hands its waiting dependents."""


def deferred_record(thread_id: str) -> ThreadRecord:
    """What a thread's dependents receive when it defers (never part of graph state)."""
    return ThreadRecord(
        id=thread_id,
        goal="",
        status="skipped",
        answer=None,
        error=DEFERRED,
        prompt_tokens=0,
        completion_tokens=0,
        critical_path_tokens=0,
        started_at=0.0,
        ended_at=0.0,
        depth=0,
        parent=None,
        attempts=0,
        verified=None,
    )


@dataclass
class RunBoard:
    """Where the threads of one graph run (root or nested) meet."""

    run_id: str
    budget: Budget
    merge: str
    width: int
    """Threads of the fan-out (for a vote: how many answers are still to come)."""
    results: dict[str, asyncio.Future[ThreadRecord]] = field(default_factory=dict)
    settle_reason: str | None = None
    winner: str | None = None
    votes: dict[str, str] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    """Ids of the threads that have a final record."""
    system: str | None = None
    """The system message all threads share (rendered once per fan-out)."""
    early: dict[str, EarlyCall] = field(default_factory=dict)
    """First requests of threads started while the plan was written, by subtask id."""
    revived: bool = False
    """Made for a run this process did not start: its budget may not know all it spent."""
    scheduled: set[str] = field(default_factory=set)
    """Ids of the threads sent side by side in this process's current step: the only ones
    a thread may wait for (for any other, it defers to the join)."""
    _guarded: dict[asyncio.Task[Any], bool] = field(default_factory=dict, repr=False)
    """The tasks in a ``guard`` now, and whether a settled vote or race leaves them be."""
    _stopping: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)
    """Guarded tasks this board cancelled (their cancel becomes ``StoppedError``)."""

    def __post_init__(self) -> None:
        self.budget.on_stop(self._later)

    def drop_early(self, keep: Iterable[str] = ()) -> list[EarlyCall]:
        """Take the early requests not in ``keep`` off the board (the caller cancels them)."""
        kept = set(keep)
        return [self.early.pop(sid) for sid in [s for s in self.early if s not in kept]]

    def _future(self, thread_id: str) -> asyncio.Future[ThreadRecord]:
        if thread_id not in self.results:
            self.results[thread_id] = asyncio.get_running_loop().create_future()
        return self.results[thread_id]

    @property
    def stop_reason(self) -> str | None:
        """Why threads of this run must stop, if they must."""
        return self.settle_reason or self.budget.stop_reason

    def publish(self, record: ThreadRecord) -> None:
        """Make a finished thread's record visible to the threads that depend on it."""
        future = self._future(record["id"])
        if not future.done():
            future.set_result(record)

    def catch_up(self, calls: Iterable[CallRecord]) -> None:
        """Count, on a revived board, the tokens the checkpoint's ``calls`` spent before."""
        if self.revived:
            spent = sum(c["prompt_tokens"] + c["completion_tokens"] for c in calls)
            if spent > self.budget.tokens_used:
                self.budget.charge(spent - self.budget.tokens_used)

    def can_wait_for(self, thread_ids: Iterable[str]) -> bool:
        """Whether every one of ``thread_ids`` has finished or runs beside the caller."""
        return all(t in self.finished or t in self.scheduled for t in thread_ids)

    def defer(self, thread_id: str) -> None:
        """``thread_id`` will run in a later step: its waiting dependents defer too."""
        self.scheduled.discard(thread_id)
        future = self.results.pop(thread_id, None)
        if future is not None and not future.done():
            future.set_result(deferred_record(thread_id))

    async def wait_for(self, thread_ids: Iterable[str]) -> list[ThreadRecord]:
        """The records of ``thread_ids`` once they all finished (raises ``StoppedError``)."""
        futures = [self._future(t) for t in thread_ids]
        if not futures:
            return []
        return await self.guard(asyncio.gather(*futures))

    async def guard(self, work: Awaitable[T], *, budget_only: bool = False) -> T:
        """Await ``work`` unless the run stops first; then cancel it and raise ``StoppedError``
        (a cancelled streamed call closes its HTTP response, so the server stops too).
        ``budget_only``: ignore a settled vote or race (for the merge step itself).

        ``work`` runs in the caller's own task (a wide fan-out keeps thousands of guards
        open): a stop cancels the task, and the guard turns that cancel alone into
        ``StoppedError``, as ``asyncio.timeout`` does.
        """
        reason = self.budget.stop_reason if budget_only else self.stop_reason
        if reason:
            if asyncio.iscoroutine(work):
                work.close()
            elif isinstance(work, asyncio.Future):
                work.cancel()  # a request already in flight (a thread started early)
            raise StoppedError(reason)
        task = asyncio.current_task()
        if task is None:  # not in a task (a bare coroutine driven by hand): nothing to cancel
            return await work
        outer = self._guarded.get(task)  # a guard within a guard of the same task
        self._guarded[task] = budget_only if outer is None else outer and budget_only
        try:
            return await work
        except asyncio.CancelledError:
            if task in self._stopping:
                self._stopping.discard(task)
                if task.uncancel() == 0:  # the stop's cancel alone: the caller's goes on
                    raise StoppedError(self.stop_reason or "stopped") from None
            raise
        finally:
            if task in self._stopping:  # cancelled, but the work finished all the same
                self._stopping.discard(task)
                task.uncancel()
            if outer is None:
                self._guarded.pop(task, None)
            else:
                self._guarded[task] = outer

    def _later(self, budget: bool = True) -> None:
        """Cancel the guarded tasks (``budget``: those of ``budget_only`` guards too) from a
        loop callback of their own (never from inside one of them: a task cannot take back
        a cancel it is about to receive)."""
        with contextlib.suppress(RuntimeError):  # no running loop: nothing is guarded
            asyncio.get_running_loop().call_soon(self._cancel_guarded, budget)

    def _cancel_guarded(self, budget: bool) -> None:
        for task, budget_only in list(self._guarded.items()):
            if (budget or not budget_only) and task not in self._stopping and not task.done():
                self._stopping.add(task)
                task.cancel()

    def settle(self, winner: str, reason: str) -> None:
        """The answer is decided (a certain majority, a verified race result)."""
        if self.winner is None:
            self.winner = winner
            self.settle_reason = reason
            self._later(budget=False)

    def vote(self, thread_id: str, answer: str) -> None:
        """Count one thread's final answer; settle as soon as the majority is certain."""
        self.votes[thread_id] = normalise_answer(answer)
        winner, lead, runner_up = majority(self.votes)
        remaining = self.width - len(self.finished)
        if lead > runner_up + remaining:
            self.settle(winner, "vote")


class Boards:
    """The live boards of the runs of one graph, by run id.

    A board lives from its run's first node to its last: ``close`` releases it when the run
    finishes, fails or is cancelled. Boards whose event loop has closed (a caller's
    ``asyncio.run`` that ended between two steps) are swept when the next one opens.
    """

    def __init__(self) -> None:
        self._boards: dict[str, RunBoard] = {}

    def __len__(self) -> int:
        return len(self._boards)

    def open(self, settings: AprSettings, parent_run: str | None, merge: str) -> RunBoard:
        """The board of a new run, on its parent's budget if nested (else a new one)."""
        parent = self._boards.get(parent_run) if parent_run else None
        budget = parent.budget if parent is not None else Budget(settings)
        return self._attach(RunBoard(uuid.uuid4().hex, budget, merge, 0))

    def _attach(self, board: RunBoard) -> RunBoard:
        for run_id in [r for r, b in self._boards.items() if b.budget.orphaned]:
            self.close(run_id, root=True)
        self._boards[board.run_id] = board
        return board

    def get(self, run_id: str) -> RunBoard | None:
        """The board of a live run."""
        return self._boards.get(run_id)

    def revive(
        self, settings: AprSettings, run_id: str, *, merge: str | None, width: int
    ) -> RunBoard:
        """The board of a live run; else a new one for a run this process did not start
        (resumed, or met again after a failure), for its plan's ``merge`` and ``width``,
        whose budget starts afresh (``RunBoard.catch_up`` counts what the checkpoint spent)."""
        board = self._boards.get(run_id)
        if board is None:
            board = RunBoard(run_id, Budget(settings), merge or "synthesize", width, revived=True)
            self._attach(board)
        return board

    def close_soon(self, run_id: str) -> None:
        """``close(run_id, root=True)`` from any thread: on the loop the run's board lives on."""
        board = self._boards.get(run_id)
        if board is not None and not board.budget.orphaned:
            board.budget.call_soon(functools.partial(self.close, run_id, root=True))

    def close(self, run_id: str, *, root: bool) -> None:
        """Release a run's board (and stop its budget's timer if it is the root run)."""
        board = self._boards.pop(run_id, None)
        if board is None:
            return
        for call in board.drop_early():
            call.task.cancel()  # a request started early that no thread adopted
        board.budget.remove_on_stop(board._later)
        if root:
            board.budget.close()
