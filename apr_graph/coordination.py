"""In-run coordination of threads: dependencies, early stop, budgets, cancellation.

All threads of one fan-out run as concurrent ``Send`` tasks of one LangGraph step. They meet on
a ``RunBoard``: a dependent thread awaits the results it needs (so it starts as soon as they
exist, not in rigid waves), a vote or race settles the run and the other threads cancel their
requests, and a ``Budget`` shared by a run and its nested forks stops everything when tokens
or time run out. Boards hold live asyncio objects, so they stay out of graph state (which
must remain JSON for checkpointers); state carries only the run id.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from apr_graph.settings import AprSettings
from apr_graph.state import ThreadRecord

__all__ = ["Boards", "Budget", "RunBoard", "StoppedError", "final_answer", "normalise_answer"]

T = TypeVar("T")

EXHAUSTED = frozenset({"deadline", "token_budget"})
"""Stop reasons that leave the answer incomplete (as opposed to a settled vote or race)."""


class StoppedError(Exception):
    """The run stopped (settled, or out of budget) while this thread waited or worked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Budget:
    """Tokens, time and thread slots of a whole run, nested forks included.

    The client charges it from its own thread as answers arrive and asks ``admits()`` right
    before each request goes out, so counting is thread-safe and the stop signal is handed
    to the run's event loop.
    """

    settings: AprSettings
    started: float = field(default_factory=time.monotonic)
    tokens_used: int = 0
    threads_started: int = 0
    stop_reason: str | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        if self.settings.deadline_s is not None:
            self._timer = self._loop.call_later(self.settings.deadline_s, self.stop, "deadline")

    @property
    def exhausted(self) -> bool:
        """Whether a token or time budget ran out."""
        return self.stop_reason in EXHAUSTED

    def admits(self) -> bool:
        """Whether a new request may be sent now."""
        return self.stop_reason is None

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline, if there is one."""
        if self.settings.deadline_s is None:
            return None
        return max(0.0, self.settings.deadline_s - (time.monotonic() - self.started))

    def reserve_threads(self, wanted: int) -> int:
        """Take up to ``wanted`` thread slots; returns how many were granted."""
        with self._lock:
            granted = max(0, min(wanted, self.settings.max_total_threads - self.threads_started))
            self.threads_started += granted
        return granted

    def charge(self, tokens: int) -> None:
        """Count tokens spent; stop the run when the token budget is reached."""
        with self._lock:
            self.tokens_used += tokens
            over = self.settings.token_budget is not None and (
                self.tokens_used >= self.settings.token_budget
            )
        if over:
            self.stop("token_budget")

    def stop(self, reason: str) -> None:
        """Stop the run: nothing new starts and running threads are cancelled."""
        with self._lock:
            if self.stop_reason is not None:
                return
            self.stop_reason = reason
        if threading.get_ident() == self._thread or self._loop is None:
            self._signal()
        else:
            with contextlib.suppress(RuntimeError):  # the run's loop is gone already
                self._loop.call_soon_threadsafe(self._signal)

    def _signal(self) -> None:
        self.stopped.set()
        if self._timer is not None:
            self._timer.cancel()

    def close(self) -> None:
        """Release the deadline timer."""
        if self._timer is not None:
            self._timer.cancel()


@dataclass
class RunBoard:
    """Where the threads of one graph run (root or nested) meet."""

    run_id: str
    budget: Budget
    merge: str
    thread_ids: list[str]
    results: dict[str, asyncio.Future[ThreadRecord]] = field(default_factory=dict)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    settle_reason: str | None = None
    winner: str | None = None
    votes: dict[str, str] = field(default_factory=dict)

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

    async def wait_for(self, thread_ids: Iterable[str]) -> list[ThreadRecord]:
        """The records of ``thread_ids`` once they all finished (raises ``StoppedError``)."""
        futures = [self._future(t) for t in thread_ids]
        if not futures:
            return []
        return await self.guard(asyncio.gather(*futures))

    async def guard(self, work: Awaitable[T], *, budget_only: bool = False) -> T:
        """Await ``work`` unless the run stops first; then cancel it and raise ``StoppedError``.

        Cancelling a streamed model call closes its HTTP response, so the server stops too.
        ``budget_only``: ignore a settled vote or race (for the merge step itself).
        """
        reason = self.budget.stop_reason if budget_only else self.stop_reason
        if reason:
            if asyncio.iscoroutine(work):
                work.close()
            raise StoppedError(reason)
        task = asyncio.ensure_future(work)
        stops = [asyncio.ensure_future(self.budget.stopped.wait())]
        if not budget_only:
            stops.append(asyncio.ensure_future(self.settled.wait()))
        try:
            await asyncio.wait([task, *stops], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in stops:
                waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            pass
        raise StoppedError(self.stop_reason or "stopped")

    def settle(self, winner: str, reason: str) -> None:
        """The answer is decided (a certain majority, a verified race result)."""
        if self.winner is None:
            self.winner = winner
            self.settle_reason = reason
            self.settled.set()

    def vote(self, thread_id: str, answer: str, finished_ids: set[str]) -> None:
        """Count one thread's final answer; settle as soon as the majority is certain."""
        self.votes[thread_id] = normalise_answer(answer)
        counts = Counter(self.votes.values()).most_common()
        leader, lead = counts[0]
        runner_up = counts[1][1] if len(counts) > 1 else 0
        remaining = len([t for t in self.thread_ids if t not in finished_ids])
        if lead > runner_up + remaining:
            winner = next(t for t, a in self.votes.items() if a == leader)
            self.settle(winner, "vote")


class Boards:
    """The live boards and budgets of the runs of one graph, by run id."""

    def __init__(self) -> None:
        self._boards: dict[str, RunBoard] = {}
        self._finished: dict[str, set[str]] = {}

    def budget_for(self, settings: AprSettings, parent_run: str | None) -> Budget:
        """The budget a new run draws on (its parent's, if nested)."""
        parent = self._boards.get(parent_run) if parent_run else None
        return parent.budget if parent is not None else Budget(settings)

    def attach(self, board: RunBoard) -> None:
        """Register a board built elsewhere."""
        self._boards[board.run_id] = board
        self._finished.setdefault(board.run_id, set())

    def get(self, run_id: str) -> RunBoard | None:
        """The board of a live run."""
        return self._boards.get(run_id)

    def revive(
        self,
        settings: AprSettings,
        run_id: str,
        plan: dict[str, Any],
        finished: Iterable[ThreadRecord] = (),
    ) -> RunBoard:
        """The board of a run resumed from a checkpoint in a new process.

        Threads that finished before the interruption are published again, so the threads
        that depend on them find their results. The budget starts afresh.
        """
        board = self._boards.get(run_id)
        if board is None:
            ids = [s["id"] for s in plan.get("subtasks", [])]
            board = RunBoard(run_id, Budget(settings), plan.get("merge") or "synthesize", ids)
            self.attach(board)
        for record in finished:
            self.finished(run_id).add(record["id"])
            board.publish(record)
        return board

    def finished(self, run_id: str) -> set[str]:
        """Ids of the run's threads that have a final record."""
        return self._finished.setdefault(run_id, set())

    def close(self, run_id: str, *, root: bool) -> None:
        """Forget a finished run (and stop its budget's timer if it is the root)."""
        board = self._boards.pop(run_id, None)
        self._finished.pop(run_id, None)
        if board is not None and root:
            board.budget.close()


_FINAL = re.compile(r"final answer\s*[:\uff1a]\s*(.+)", re.I)


def final_answer(text: str) -> str:
    """The final answer of a thread: after its last 'Final answer:', else its last line."""
    found = _FINAL.findall(text)
    if found:
        return str(found[-1]).strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalise_answer(answer: str) -> str:
    """A form of an answer in which equal answers compare equal."""
    cleaned = re.sub(r"[*$`\\]|\\boxed\{|\}", "", answer).strip().rstrip(".").lower()
    return re.sub(r"\s+", " ", cleaned)


def estimate_saved(cancelled: list[ThreadRecord], done: list[ThreadRecord]) -> dict[str, Any]:
    """What cancelling threads saved, estimated from the threads that finished."""
    if not cancelled:
        return {"saved_tokens_estimate": 0, "saved_seconds_estimate": 0.0}
    if not done:
        return {"saved_tokens_estimate": None, "saved_seconds_estimate": None}
    tokens = sorted(t["completion_tokens"] for t in done)[len(done) // 2]
    seconds = sorted(t["ended_at"] - t["started_at"] for t in done)[len(done) // 2]
    return {
        "saved_tokens_estimate": sum(max(0, tokens - t["completion_tokens"]) for t in cancelled),
        "saved_seconds_estimate": round(
            sum(max(0.0, seconds - (t["ended_at"] - t["started_at"])) for t in cancelled), 3
        ),
    }


REGISTRY = Boards()
"""The live boards of this process, by run id (ids are random, so graphs can share it)."""
