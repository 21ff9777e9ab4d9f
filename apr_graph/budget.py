"""A run's budget: tokens, time and thread slots, shared by a run and its nested forks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from apr_graph.settings import AprSettings

__all__ = ["EXHAUSTED", "Budget", "StoppedError"]

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

    The client charges it as answers arrive and asks ``admits()`` before each request. Only
    the run's own event loop touches it, so it needs no lock and signals a stop at once.
    """

    settings: AprSettings
    started: float = field(default_factory=time.monotonic)
    tokens_used: int = 0
    threads_started: int = 0
    stop_reason: str | None = None
    _on_stop: list[Callable[[], None]] = field(default_factory=list)
    _timer: asyncio.TimerHandle | None = None
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def __post_init__(self) -> None:
        if self.settings.deadline_s is not None:
            self._timer = self._loop.call_later(self.settings.deadline_s, self.stop, "deadline")

    @property
    def orphaned(self) -> bool:
        """Whether the run's event loop has closed (nothing will ever finish this run)."""
        return self._loop.is_closed()

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

    def room_for(self, tokens: int) -> bool:
        """Whether one more request of ``tokens`` fits: the run is not stopped and the token
        budget, if any, has that many left."""
        budget = self.settings.token_budget
        return self.admits() and (budget is None or budget - self.tokens_used >= tokens)

    def reserve_threads(self, wanted: int) -> int:
        """Take up to ``wanted`` thread slots; returns how many were granted.

        A slot is taken before a thread's request is sent (or before it forks) and pays for
        one worker request at most: a request that was sent and then discarded keeps its
        slot spent, so ``max_total_threads`` bounds the worker requests a run sends.
        """
        granted = max(0, min(wanted, self.settings.max_total_threads - self.threads_started))
        self.threads_started += granted
        return granted

    def release_threads(self, count: int) -> None:
        """Give back ``count`` slots whose requests were never handed to the client."""
        self.threads_started = max(0, self.threads_started - count)

    def charge(self, tokens: int) -> None:
        """Count tokens spent; stop the run when the token budget is reached."""
        self.tokens_used += tokens
        budget = self.settings.token_budget
        if budget is not None and self.tokens_used >= budget:
            self.stop("token_budget")

    def stop(self, reason: str) -> None:
        """Stop the run: nothing new starts and running threads are cancelled."""
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        self.close()
        callbacks, self._on_stop = self._on_stop, []
        for callback in callbacks:
            callback()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the run's loop when the run stops (at once if it has)."""
        if self.stop_reason is not None:
            callback()
        else:
            self._on_stop.append(callback)

    def remove_on_stop(self, callback: Callable[[], None]) -> None:
        """Forget a callback given to ``on_stop`` (its board was released)."""
        with contextlib.suppress(ValueError):
            self._on_stop.remove(callback)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the run's event loop, from any thread."""
        self._loop.call_soon_threadsafe(callback)

    def close(self) -> None:
        """Release the deadline timer."""
        if self._timer is not None:
            self._timer.cancel()
