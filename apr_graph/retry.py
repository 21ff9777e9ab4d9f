"""The one retry policy: which failures are worth another request, and how long to wait.

It retries only what ``failures.classify`` calls transient, honours ``Retry-After`` (a junk
value means "no advice"), and stops instead of sleeping past ``retry_max_wait_s`` or the run's
deadline.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from typing import Protocol

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from apr_graph.settings import AprSettings

__all__ = ["CallBudget", "RetryPolicy", "retry_after_s"]


class CallBudget(Protocol):
    """What a run's budget offers the client: may a request go out, and what did it cost."""

    def admits(self) -> bool:
        """Whether a new request may be sent now."""

    def charge(self, tokens: int) -> None:
        """Count the tokens of one answered request (thread-safe)."""

    def remaining_s(self) -> float | None:
        """Seconds left before the run's deadline, if it has one."""


def _parse_seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None  # "soon", "", garbage: the server gave no usable advice
        return max(0.0, parsed.timestamp() - time.time())
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no advice either


def retry_after_s(exc: BaseException | None) -> float | None:
    """The pause a failed response asks for (``Retry-After-Ms`` / ``Retry-After``), if any."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    for name, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = None if headers is None else headers.get(name)
        if value is not None and (seconds := _parse_seconds(value)) is not None:
            return seconds / scale
    return None


class RetryPolicy:
    """Builds the retry loop of one call from ``settings`` (``max_retries``,
    ``retry_max_wait_s``)."""

    def __init__(self, settings: AprSettings) -> None:
        self.settings = settings
        self._backoff = wait_exponential_jitter(
            multiplier=0.25, jitter=0.25, max=settings.retry_max_wait_s
        )

    def retrying(
        self, retryable: Callable[[BaseException], bool], budget: CallBudget | None
    ) -> AsyncRetrying:
        """A tenacity loop retrying what ``retryable`` accepts, within the limits."""
        attempts, max_wait_s = self.settings.max_retries + 1, self.settings.retry_max_wait_s

        def stop(state: RetryCallState) -> bool:
            """Out of attempts, or the server asks for a longer pause than allowed or than the
            run has left: fail fast instead of sleeping past the deadline."""
            if state.attempt_number >= attempts:
                return True
            if (delay := _advised(state)) is None:
                return False
            remaining = budget.remaining_s() if budget is not None else None
            return delay > max_wait_s or (remaining is not None and delay > remaining)

        return AsyncRetrying(
            retry=retry_if_exception(retryable), stop=stop, wait=self._wait, reraise=True
        )

    def _wait(self, state: RetryCallState) -> float:
        delay = _advised(state)
        if delay is None:
            delay = self._backoff(state)
        return min(delay, self.settings.retry_max_wait_s)


def _advised(state: RetryCallState) -> float | None:
    """The pause the failed attempt's response asks for, if any."""
    return retry_after_s(state.outcome.exception() if state.outcome is not None else None)
