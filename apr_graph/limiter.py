"""Adaptive concurrency toward one server (AIMD): a 429 or 503 halves the requests allowed in
flight (never below 1); every ``limit`` successes in a row raise it by one, up to the maximum.

One limiter serves every event loop that sends to its server: its counts are guarded by a
thread lock, not by asyncio primitives (those belong to one loop), and a waiter is woken on its
own loop.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["AdaptiveLimiter"]


def _grant(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class AdaptiveLimiter:
    """An async context manager admitting at most ``limit`` holders at once (AIMD), first
    come first served, from any event loop."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_flight = 0
        self._successes = 0
        self._lock = threading.Lock()
        self._waiting: dict[asyncio.Future[None], None] = {}
        """Waiters in arrival order (a dict: removed in O(1)); one taken out was given a slot."""

    async def __aenter__(self) -> AdaptiveLimiter:
        with self._lock:
            if self.in_flight < self.limit and not self._waiting:
                self.in_flight += 1
                return self
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[waiter] = None
        try:
            await waiter
        except BaseException:
            with self._lock:
                if self._waiting.pop(waiter, None) is None:  # a slot was given: pass it on
                    self.in_flight -= 1
                    self._admit()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        with self._lock:
            self.in_flight -= 1
            self._admit()

    def _admit(self) -> None:
        """Give free slots to the first waiters (the lock held)."""
        while self._waiting and self.in_flight < self.limit:
            waiter = next(iter(self._waiting))
            del self._waiting[waiter]
            loop = waiter.get_loop()
            if loop.is_closed():
                continue  # nobody will ever take it
            self.in_flight += 1
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:  # released from a thread with no loop
                running = None
            if loop is running:
                _grant(waiter)
                continue
            try:
                loop.call_soon_threadsafe(_grant, waiter)
            except RuntimeError:  # its loop closed meanwhile
                self.in_flight -= 1

    def resize(self, maximum: int) -> None:
        """Set the maximum (and the current limit) to ``maximum``: what the server runs."""
        with self._lock:
            self.maximum = self.limit = maximum
            self._admit()

    def overloaded(self) -> None:
        """The server pushed back (429/503): halve the limit."""
        with self._lock:
            self.limit = max(1, self.limit // 2)
            self._successes = 0

    def succeeded(self) -> None:
        """One request went through: after ``limit`` in a row, allow one more."""
        if self.limit >= self.maximum:
            return
        with self._lock:
            self._successes += 1
            if self._successes >= self.limit:
                self._successes = 0
                self.limit += 1
                self._admit()
