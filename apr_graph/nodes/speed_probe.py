"""A first measure of what threads at once buy on an endpoint, taken before it is forked on.

An endpoint whose speed profile has no figure for streams at once (no ``apr calibrate``, no
forked run yet) would be forked on blind: on a CPU server that costs a task several times
its direct answer's time. So before the first top-level decision that needs the figure,
the endpoint is measured once per graph (``AprSettings.probe_speed``): one stream (unless the
profile has its rate), then ``streams`` at once, each asked to count for ``PROBE_TOKENS``
tokens. The calls are the run's (role ``probe``, in its records and token budget), and the
profile learns from them as from any run's calls, so later runs and processes reuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from apr_graph.budget import Budget, StoppedError
from apr_graph.capacity import ProbeOnce
from apr_graph.errors import AprError, BudgetExhaustedError
from apr_graph.events import emit
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.settings import AprSettings
from apr_graph.speed import COUNT, SpeedProfile, SpeedStore
from apr_graph.state import CallRecord

__all__ = ["PROBE_TIMEOUT_S", "PROBE_TOKENS", "SpeedProbes"]

PROBE_TOKENS = 32
"""Tokens each probe reply is asked for: enough to time a decode rate, few enough to cost
a few seconds on a 1.5B model on 2 CPU cores (well under one on a GPU server)."""
PROBE_TIMEOUT_S = 60.0
"""A probe that takes longer (or over a quarter of the run's deadline) is given up: the run
goes on as if it had not been asked, and a later run probes again."""


class SpeedProbes:
    """One probe per endpoint for the graph's runs, from any event loop: a run that finds
    the endpoint's probe under way waits for it, then reads the profile it stored."""

    def __init__(self) -> None:
        self._once: dict[str, ProbeOnce] = {}
        self._lock = threading.Lock()

    async def profile(
        self,
        client: LLMClient,
        settings: AprSettings,
        store: SpeedStore,
        endpoint: str,
        streams: int,
        *,
        budget: Budget,
        calls: list[CallRecord],
    ) -> SpeedProfile | None:
        """``endpoint``'s profile once it has a figure for ``streams`` at once (measured now,
        by another run, or not at all if the probe failed: a notice says why). The probe's
        calls are added to ``calls``."""
        with self._lock:
            once = self._once.setdefault(endpoint, ProbeOnce())

        async def probe() -> None:
            known = await store.aget(endpoint)
            if known is not None and max(known.decode_tps) > 1:  # another process measured it
                return
            emit("notice", text=f"apr: measuring what {streams} threads at once buy here (once)")
            own: list[CallRecord] = []
            remaining = budget.remaining_s()  # a deadline: the probe may take a quarter of it
            limit = PROBE_TIMEOUT_S if remaining is None else min(PROBE_TIMEOUT_S, remaining / 4)
            try:
                async with asyncio.timeout(limit):
                    await _measure(client, settings, streams, budget, own, alone=known is None)
            except (AprError, StoppedError, TimeoutError) as exc:
                calls.extend(own)
                late = isinstance(exc, TimeoutError | StoppedError | BudgetExhaustedError)
                reason = f"it took over {limit:.1f}s" if isinstance(exc, TimeoutError) else exc
                emit("notice", text=f"apr: the speed probe failed ({reason}): deciding without it")
                if late:  # a later run may have the time
                    raise _LateError from None
                return
            calls.extend(own)
            learned = await asyncio.to_thread(store.observe, endpoint, own)
            if learned is not None:
                gain = learned.gain(streams)
                emit("notice", text=f"apr: {streams} at once decode {gain:.2f}x one stream here")

        with contextlib.suppress(_LateError):
            await once.run(probe)
        return await store.aget(endpoint)


class _LateError(Exception):
    """The probe ran out of time or budget (its timeout, the run's deadline or tokens): not
    done, so a later run probes again."""


async def _measure(
    client: LLMClient,
    settings: AprSettings,
    streams: int,
    budget: Budget,
    calls: list[CallRecord],
    *,
    alone: bool,
) -> None:
    """The probe's calls, each added to ``calls`` as it ends: one stream alone (if
    ``alone``), then ``streams`` at once."""
    # Counting repeats digits: the loop guard must not cut it short. The profile is of the
    # worker model (the endpoint's key).
    update = {"stop_loops": False, "model": settings.model_for("worker")}
    client = client.for_run(settings.model_copy(update=update))

    async def ask() -> None:
        done = await client.chat(
            COUNT, role="probe", max_tokens=PROBE_TOKENS, temperature=0.0, budget=budget
        )
        calls.append(call_record(done, role="probe"))

    if alone:
        await ask()
    await asyncio.gather(*(ask() for _ in range(streams)))
