"""Speed profiles remembered per endpoint in a JSON file, and learned from runs' own calls.

The file (``{"version": 1, "endpoints": {key: profile}}``) is shared by the user's processes:
a write re-reads it, replaces only its endpoint's entry and lands atomically (last writer
wins). A corrupt file warns, reads as empty, and is kept as ``<name>.corrupt`` on next write.

A calibration's figures count as ``CALIBRATION_WEIGHT`` observations; a finished run is one
per stream count, moving a figure by ``1 / (weight + 1)`` of the difference but at least
``MIN_ALPHA``: a calibration outweighs a few runs, a changed server is followed within dozens.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langgraph.config import get_store
from langgraph.store.base import BaseStore

from apr_graph.settings import AprSettings
from apr_graph.speed_profile import SpeedProfile
from apr_graph.state import CallRecord

__all__ = [
    "CALIBRATION_WEIGHT",
    "MIN_ALPHA",
    "PROFILES",
    "GraphSpeedStore",
    "SpeedStore",
    "default_speed_file",
    "endpoint_key",
    "profile_key",
    "run_speed_store",
]

CALIBRATION_WEIGHT = 8.0
"""Observations one calibration figure counts as: a few noisy runs do not undo it."""
MIN_ALPHA = 0.1
"""The least share of a figure a new observation moves: the average keeps following."""
MIN_TOKENS = 16  # shorter calls time mostly noise, not the decode rate
SMALL_PROMPT = 256  # uncached prompt tokens below which the first-token wait is mostly latency
LARGE_PROMPT = 512  # uncached prompt tokens from which the first-token wait is mostly prefill
PART_MEMORY = 10.0  # most runs a thread answer's learned length rests on: newer ones move it
_VERSION = 1
PROFILES = ("apr_graph", "speed_profiles")
"""The namespace of endpoint speed profiles in a LangGraph store (key: ``endpoint_key``)."""


def endpoint_key(base_url: str, model: str) -> str:
    """The store's key of a server and model: ``model @ url`` (trailing ``/`` and the case
    of scheme and host ignored)."""
    url = base_url.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if sep:
        host, slash, path = rest.partition("/")
        url = f"{scheme.lower()}://{host.lower()}{slash}{path}"
    return f"{model} @ {url}"


def profile_key(settings: AprSettings, base_url: str) -> str:
    """The store's key of the profile runs with ``settings`` on ``base_url`` decide with: the
    worker model at ``settings.speed_endpoint`` or ``base_url``."""
    return endpoint_key(settings.speed_endpoint or base_url, settings.model_for("worker"))


def default_speed_file() -> Path:
    """``$APR_SPEED_FILE``, else ``$XDG_CACHE_HOME/apr-graph/speed.json`` (``~/.cache``)."""
    if given := os.environ.get("APR_SPEED_FILE", "").strip():
        return Path(given).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "apr-graph" / "speed.json"


class SpeedStore:
    """Speed profiles by endpoint key, in a JSON file (``path``) or in memory (``None``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: dict[str, Any] = {}
        # The file's entries as last read, by its (mtime, size): a run reads it once, and
        # most runs find it unchanged.
        self._cache: tuple[tuple[int, int], dict[str, Any]] | None = None

    def get(self, endpoint: str) -> SpeedProfile | None:
        """The profile of ``endpoint``, or ``None`` (unknown, or unreadable: a warning)."""
        return self._parse(endpoint, self._entry(endpoint))

    async def aget(self, endpoint: str) -> SpeedProfile | None:
        """``get`` for async code (a LangGraph store is asked without blocking the loop)."""
        return self.get(endpoint)

    def _parse(self, endpoint: str, data: Any) -> SpeedProfile | None:
        if data is None:
            return None
        try:
            return SpeedProfile.from_json(data)
        except ValueError as exc:
            warnings.warn(
                f"speed profiles in {self.where}: the entry of {endpoint!r} is unreadable "
                f"({exc}); it is ignored",
                stacklevel=3,
            )
            return None

    @property
    def where(self) -> str:
        """Where the profiles are kept, for messages."""
        return str(self.path) if self.path is not None else "memory"

    def _entry(self, endpoint: str) -> Any:
        return self._read().get(endpoint)

    def put(self, endpoint: str, profile: SpeedProfile) -> None:
        """Store ``profile`` as ``endpoint``'s, keeping every other endpoint's entry."""
        if self.path is None:
            self._memory[endpoint] = profile.to_json()
            return
        entries = self._read(keep_corrupt=True)
        entries[endpoint] = profile.to_json()
        text = json.dumps({"version": _VERSION, "endpoints": entries}, indent=2, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def observe(self, endpoint: str, calls: Sequence[CallRecord]) -> SpeedProfile | None:
        """Learn decode rates, first-token latency, prefill rate and thread-answer length from
        a finished run's calls, and store the result.

        Returns:
            The updated profile, or ``None`` when nothing is stored and nothing was learned.
        """
        stored = self.get(endpoint)
        learned = _observed_rates(calls)
        first_token = _observed_first_token(calls)
        part = _observed_part(calls)
        wait = first_token if first_token is not None else stored and stored.first_token_s
        prefill = _observed_prefill(calls, wait or 0.0)
        if not learned and first_token is None and part is None and prefill is None:
            return stored
        decode = dict(stored.decode_tps) if stored else {}
        weights = dict(stored.weights) if stored else {}
        for streams, tps in learned.items():
            if streams not in decode:  # a new stream count starts from the curve's guess, if any
                old, weight = (stored.aggregate_tps(streams) if stored else None), 1.0
            else:  # a figure without a weight was measured: a calibration's
                old, weight = decode[streams], weights.get(streams, CALIBRATION_WEIGHT)
            decode[streams], weights[streams] = _blend(old, weight, tps)
        if not decode:  # only a latency was seen: no profile stands on that alone
            return stored
        latency = stored.first_token_s if stored else None
        latency_weight = (stored.first_token_weight or CALIBRATION_WEIGHT) if stored else 0.0
        if first_token is not None:
            latency, latency_weight = _blend(latency, latency_weight, first_token)
        prefill_tps = stored.prefill_tps if stored else None
        prefill_weight = (stored.prefill_weight or CALIBRATION_WEIGHT) if stored else 0.0
        if prefill is not None:
            prefill_tps, prefill_weight = _blend(prefill_tps, prefill_weight, prefill)
        part_tokens = stored.part_tokens if stored else None
        part_weight = stored.part_weight if stored else 0.0
        if part is not None:  # the last PART_MEMORY runs count: a model's habits change
            part_tokens, part_weight = _blend(part_tokens, min(part_weight, PART_MEMORY), part)
        observed = (stored.observed_calls if stored else 0) + len(calls)
        # What the figures rest on besides observations: a calibration, say ("" if none).
        base = stored.source.split("observed in")[0].rstrip("; ") if stored else ""
        since = f"observed in {observed} calls" + (" since" if base else "")
        profile = SpeedProfile(
            decode_tps=decode,
            prefill_tps=prefill_tps,
            first_token_s=latency,
            source=f"{base}; {since}" if base else since,
            weights=weights,
            first_token_weight=latency_weight,
            prefill_weight=prefill_weight,
            observed_calls=observed,
            part_tokens=part_tokens,
            part_weight=part_weight,
        )
        self.put(endpoint, profile)
        return profile

    def _read(self, *, keep_corrupt: bool = False) -> dict[str, Any]:
        """The raw entries by endpoint; a corrupt file warns and reads as empty (moved aside
        as ``<name>.corrupt`` with ``keep_corrupt``, before it is written over)."""
        if self.path is None:
            return dict(self._memory)
        try:
            stat = self.path.stat()
            if self._cache is not None and self._cache[0] == (stat.st_mtime_ns, stat.st_size):
                return dict(self._cache[1])
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            warnings.warn(
                f"speed file {self.path} is unreadable ({exc}): treated as empty", stacklevel=3
            )
            return {}
        try:
            data = json.loads(text)
            entries = data["endpoints"]
            if not isinstance(entries, dict):
                raise TypeError("endpoints is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            warnings.warn(
                f"speed file {self.path} is corrupt ({exc}): treated as empty; "
                f"it is kept as {aside} when next written",
                stacklevel=3,
            )
            if keep_corrupt:
                os.replace(self.path, aside)
            return {}
        self._cache = ((stat.st_mtime_ns, stat.st_size), dict(entries))
        return dict(entries)


class GraphSpeedStore(SpeedStore):
    """Speed profiles in a LangGraph store (``BaseStore``, under ``PROFILES``): the one a graph
    is compiled with, or LangGraph Server's, shared by every process and replica using it."""

    def __init__(self, store: BaseStore) -> None:
        super().__init__(None)
        self.store = store

    @property
    def where(self) -> str:
        return f"the LangGraph store {PROFILES}"

    def _entry(self, endpoint: str) -> Any:
        item = self.store.get(PROFILES, endpoint)
        return None if item is None else item.value

    async def aget(self, endpoint: str) -> SpeedProfile | None:
        item = await self.store.aget(PROFILES, endpoint)
        return self._parse(endpoint, None if item is None else item.value)

    def put(self, endpoint: str, profile: SpeedProfile) -> None:
        self.store.put(PROFILES, endpoint, profile.to_json())


def run_speed_store(default: SpeedStore, settings: AprSettings) -> SpeedStore:
    """Where a run's endpoint speeds are kept: its graph's LangGraph store, if it has one and
    ``settings.speed_file`` is not set, else ``default``. Called from a graph node."""
    if settings.speed_file is not None:
        return default
    try:
        store = get_store()
    except RuntimeError:  # not inside a graph run
        return default
    return default if store is None else GraphSpeedStore(store)


def _blend(old: float | None, weight: float, new: float) -> tuple[float, float]:
    """``old`` (resting on ``weight`` observations) moved towards one new observation."""
    if old is None or weight <= 0:
        return new, 1.0
    alpha = max(1.0 / (weight + 1.0), MIN_ALPHA)
    return old + alpha * (new - old), weight + 1.0


def _observed_rates(calls: Sequence[CallRecord]) -> dict[int, float]:
    """Aggregate tokens/s by stream count, weighted by time: each call of ``MIN_TOKENS`` or
    more gives its decode rate x how many of the run's calls decoded beside it on average
    (other runs' calls on the server are not seen)."""
    spans = [(c.get("first_token_at") or c["started_at"], c["ended_at"]) for c in calls]
    seen: dict[int, list[tuple[float, float]]] = {}
    for call, (start, end) in zip(calls, spans, strict=True):
        duration = end - start
        if call["completion_tokens"] < MIN_TOKENS or duration <= 0:
            continue
        decoded = call["completion_tokens"] - (1 if call.get("first_token_at") else 0)
        beside = sum(max(0.0, min(end, e) - max(start, s)) for s, e in spans) / duration
        streams = max(1, round(beside))
        seen.setdefault(streams, []).append((decoded / duration * beside, duration))
    return {
        streams: sum(tps * t for tps, t in figures) / sum(t for _, t in figures)
        for streams, figures in seen.items()
    }


def _observed_part(calls: Sequence[CallRecord]) -> float | None:
    """The mean length of the run's thread answers (a thread's worker calls together, since
    continuations are the same answer) whose last call stopped by itself: one cut by its
    limit, or that looped, says nothing of what an answer takes."""
    threads: dict[object, list[CallRecord]] = {}
    for call in calls:
        if call["role"] == "worker":
            threads.setdefault(call["thread_id"] or id(call), []).append(call)
    lengths = [
        sum(call["completion_tokens"] for call in own)
        for own in threads.values()
        if own[-1].get("finish_reason") == "stop"
    ]
    return statistics.fmean(lengths) if lengths else None


def _observed_first_token(calls: Sequence[CallRecord]) -> float | None:
    """The median first-token wait of calls whose uncached prompt was small."""
    waits = [
        first - call["started_at"]
        for call in calls
        if (first := call.get("first_token_at")) is not None
        and call["prompt_tokens"] - (call["cached_tokens"] or 0) <= SMALL_PROMPT
        and first >= call["started_at"]
    ]
    return statistics.median(waits) if waits else None


def _observed_prefill(calls: Sequence[CallRecord], latency: float) -> float | None:
    """The median prefill rate of calls whose uncached prompt was large and whose wait for a
    first token no other call of the run shared (prefills at once share the compute: each
    alone says too little of the rate): uncached tokens over the wait beyond ``latency``."""
    rates = []
    for call in calls:
        first, start = call.get("first_token_at"), call["started_at"]
        uncached = call["prompt_tokens"] - (call["cached_tokens"] or 0)
        if first is None or uncached < LARGE_PROMPT or first - start <= latency:
            continue
        if not any(
            o is not call and o["started_at"] < first and o["ended_at"] > start for o in calls
        ):
            rates.append(uncached / (first - start - latency))
    return statistics.median(rates) if rates else None
