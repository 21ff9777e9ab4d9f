"""Adaptive concurrency toward one server: additive increase, multiplicative decrease.

A 429 or 503 halves the number of requests allowed in flight (never below 1); every
``limit`` successes in a row raise it by one, back up to the configured maximum. A storm of
429s thus becomes a trickle of retries instead of a storm of them.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["AdaptiveLimiter"]


class AdaptiveLimiter:
    """An async context manager admitting at most ``limit`` holders at once (AIMD)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_flight = 0
        self.decreases = 0
        self._successes = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> AdaptiveLimiter:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def overloaded(self) -> None:
        """The server pushed back (429/503): halve the limit."""
        self.limit = max(1, self.limit // 2)
        self._successes = 0
        self.decreases += 1

    def succeeded(self) -> None:
        """One request went through: after ``limit`` in a row, allow one more."""
        if self.limit >= self.maximum:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            self.limit += 1
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()
