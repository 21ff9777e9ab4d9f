"""What concurrency buys on one endpoint, and the wall time a direct answer or a plan takes.

A ``SpeedProfile`` holds measured rates (decode tokens/s by streams at once, prefill tokens/s,
first-token latency); the predictions turn them into seconds, so a fork decision can compare
one direct call with planning + threads + merge on the server at hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

__all__ = ["SpeedProfile", "predict_call_s", "predict_plan_s"]


@dataclass(frozen=True)
class SpeedProfile:
    """Measured speed of one endpoint (one server and model).

    Attributes:
        decode_tps: aggregate completion tokens/s with k streams decoding at once, by k.
        prefill_tps: uncached prompt tokens/s (``None``: not measured).
        first_token_s: latency of a minimal request: network, queue, a tiny prefill.
        source: where the figures come from (``apr calibrate, <date>``, ``observed in N calls``).
        weights: how many observations each ``decode_tps`` figure rests on (a calibration
            counts as several).
        first_token_weight: the same for ``first_token_s``.
        prefill_weight: the same for ``prefill_tps``.
        observed_calls: calls learned from since the profile was measured.
        part_tokens: what one thread's answer takes on this endpoint, learned from runs'
            finished threads (``None``: not seen yet; ``decide.PART_TOKENS`` stands in).
        part_weight: how many runs ``part_tokens`` rests on.
    """

    decode_tps: Mapping[int, float]
    prefill_tps: float | None
    first_token_s: float | None
    source: str
    weights: Mapping[int, float] = field(default_factory=dict)
    first_token_weight: float = 0.0
    prefill_weight: float = 0.0
    observed_calls: int = 0
    part_tokens: float | None = None
    part_weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.decode_tps:
            raise ValueError("SpeedProfile needs decode_tps for at least one stream count")
        for streams, tps in self.decode_tps.items():
            if streams < 1 or not (tps > 0 and math.isfinite(tps)):
                raise ValueError(f"decode_tps[{streams}] = {tps}: need k >= 1 and a rate > 0")
        if self.prefill_tps is not None and not self.prefill_tps > 0:
            raise ValueError(f"prefill_tps = {self.prefill_tps}: need a rate > 0 or None")
        if self.first_token_s is not None and not self.first_token_s >= 0:
            raise ValueError(f"first_token_s = {self.first_token_s}: need >= 0 or None")

    def aggregate_tps(self, streams: int) -> float:
        """Completion tokens/s of ``streams`` streams together: linear between measured counts,
        flat beyond the largest (slots run out) and below the smallest (no unmeasured gain)."""
        if streams < 1:
            raise ValueError(f"streams = {streams}: need at least 1")
        points = sorted(self.decode_tps.items())
        if streams <= points[0][0]:
            return points[0][1]
        for (k0, tps0), (k1, tps1) in pairwise(points):
            if streams <= k1:
                return tps0 + (tps1 - tps0) * (streams - k0) / (k1 - k0)
        return points[-1][1]

    def gain(self, streams: int) -> float:
        """What ``streams`` streams decode together, as a multiple of one stream."""
        return self.aggregate_tps(streams) / self.aggregate_tps(1)

    def to_json(self) -> dict[str, Any]:
        """The profile as JSON-ready data (stream counts as string keys)."""
        return {
            "decode_tps": {str(k): round(v, 3) for k, v in sorted(self.decode_tps.items())},
            "prefill_tps": None if self.prefill_tps is None else round(self.prefill_tps, 3),
            "first_token_s": None if self.first_token_s is None else round(self.first_token_s, 4),
            "source": self.source,
            "weights": {str(k): round(v, 3) for k, v in sorted(self.weights.items())},
            "first_token_weight": round(self.first_token_weight, 3),
            "prefill_weight": round(self.prefill_weight, 3),
            "observed_calls": self.observed_calls,
            "part_tokens": None if self.part_tokens is None else round(self.part_tokens, 1),
            "part_weight": round(self.part_weight, 3),
        }

    @classmethod
    def from_json(cls, data: Any) -> SpeedProfile:
        """A profile from ``to_json`` data (``ValueError`` if the data is not a profile)."""
        if not isinstance(data, dict):
            raise ValueError(f"a speed profile is a JSON object, not {type(data).__name__}")
        try:
            return cls(
                decode_tps={int(k): float(v) for k, v in dict(data["decode_tps"]).items()},
                prefill_tps=_optional_float(data.get("prefill_tps")),
                first_token_s=_optional_float(data.get("first_token_s")),
                source=str(data.get("source", "")),
                weights={int(k): float(v) for k, v in dict(data.get("weights") or {}).items()},
                first_token_weight=float(data.get("first_token_weight") or 0.0),
                prefill_weight=float(data.get("prefill_weight") or 0.0),
                observed_calls=int(data.get("observed_calls") or 0),
                part_tokens=_optional_float(data.get("part_tokens")),
                part_weight=float(data.get("part_weight") or 0.0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a speed profile: {exc}") from exc


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _prefill_s(profile: SpeedProfile, tokens: int) -> float:
    return tokens / profile.prefill_tps if profile.prefill_tps and tokens > 0 else 0.0


def _check(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} = {value}: need >= 0")


def predict_call_s(
    profile: SpeedProfile,
    *,
    prompt_tokens: int,
    output_tokens: int,
    streams: int = 1,
    cached_tokens: int = 0,
) -> float:
    """Seconds one call takes while ``streams`` streams (itself included) decode at once:
    first-token latency + uncached prefill + its tokens at one stream's share of the rate."""
    _check(prompt_tokens=prompt_tokens, output_tokens=output_tokens, cached_tokens=cached_tokens)
    per_stream = profile.aggregate_tps(streams) / streams
    return (
        (profile.first_token_s or 0.0)
        + _prefill_s(profile, prompt_tokens - min(cached_tokens, prompt_tokens))
        + output_tokens / per_stream
    )


def _batch_s(profile: SpeedProfile, prompt_tokens: int, tokens: Sequence[int]) -> float:
    """Seconds a batch of threads started together takes, until its longest ends: prompts
    prefilled one after another (prefill is compute-bound), then all decode, the rest
    speeding up to the rate of fewer streams as the shorter threads end."""
    elapsed = (profile.first_token_s or 0.0) + len(tokens) * _prefill_s(profile, prompt_tokens)
    done = 0
    for index, length in enumerate(sorted(tokens)):
        running = len(tokens) - index
        elapsed += (length - done) / (profile.aggregate_tps(running) / running)
        done = length
    return elapsed


def predict_plan_s(
    profile: SpeedProfile,
    *,
    prompt_tokens: int,
    plan_tokens: int,
    thread_prompt_tokens: int,
    thread_tokens: list[int],
    width: int,
    merge_prompt_tokens: int,
    merge_tokens: int,
) -> float:
    """Seconds a plan takes: the planning call, the threads in batches of ``width`` (each
    lasting until its longest thread ends), the merge (``merge_tokens == 0``: no call)."""
    _check(plan_tokens=plan_tokens, thread_prompt_tokens=thread_prompt_tokens)
    _check(merge_prompt_tokens=merge_prompt_tokens, merge_tokens=merge_tokens)
    if width < 1 or any(t < 0 for t in thread_tokens):
        raise ValueError(f"width = {width}, thread_tokens = {thread_tokens}: need width >= 1")
    total = predict_call_s(profile, prompt_tokens=prompt_tokens, output_tokens=plan_tokens)
    for start in range(0, len(thread_tokens), width):
        total += _batch_s(profile, thread_prompt_tokens, thread_tokens[start : start + width])
    if merge_tokens > 0:
        total += predict_call_s(
            profile, prompt_tokens=merge_prompt_tokens, output_tokens=merge_tokens
        )
    return total
