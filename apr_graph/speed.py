"""What forking buys on the server at hand: measure it, remember it, predict wall times.

``calibrate`` measures an endpoint (``apr calibrate``); ``SpeedStore`` remembers profiles per
endpoint and learns from runs' calls; ``predict_call_s`` and ``predict_plan_s`` turn a profile
into the seconds of a direct answer and of a plan.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from apr_graph.errors import AprError
from apr_graph.llm import LLMClient
from apr_graph.responses import Completion, Message
from apr_graph.speed_profile import SpeedProfile, predict_call_s, predict_plan_s
from apr_graph.speed_store import CALIBRATION_WEIGHT, SpeedStore, default_speed_file, endpoint_key

__all__ = [
    "COUNT",
    "SpeedProfile",
    "SpeedStore",
    "calibrate",
    "default_speed_file",
    "endpoint_key",
    "predict_call_s",
    "predict_plan_s",
]

COUNT: list[Message] = [{"role": "user", "content": "Count from 1 to 500, separated by spaces."}]
"""What a timed request asks (``apr calibrate``, the speed probe): a long, predictable reply."""
_PREFILL_WORDS = 1000  # about a thousand tokens with common English words
_MIN_DECODED = 16  # fewer tokens than this time only noise
_VOCABULARY = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea"
)


def _first_token_s(completion: Completion) -> float:
    return (completion.first_token_at or completion.ended_at) - completion.started_at


def _aggregate_tps(done: Sequence[Completion]) -> float:
    """Tokens/s of calls decoding together: the tokens after each first one, over the time
    from the earliest first token to the last end (prefill and queueing left out)."""
    short = min(c.completion_tokens for c in done)
    if short < _MIN_DECODED:
        raise AprError(
            f"the model stopped after {short} tokens, too few to time: calibration asks it "
            "to count to 500 and needs a model that does (not a tiny demo model)"
        )
    decoded = sum(c.completion_tokens - (1 if c.first_token_at else 0) for c in done)
    start = min(c.first_token_at or c.started_at for c in done)
    return decoded / max(max(c.ended_at for c in done) - start, 1e-6)


def _unique(text: str) -> list[Message]:
    """``text`` after a nonce: a message no prefix cache has seen."""
    return [{"role": "user", "content": f"Note {random.getrandbits(64):016x}: {text}"}]


async def calibrate(
    client: LLMClient,
    *,
    streams: int = 4,
    tokens: int = 96,
    on_progress: Callable[[str], None] | None = None,
) -> SpeedProfile:
    """Measure ``client``'s endpoint: decode tokens/s of 1, 2 and ``streams`` streams at once
    (each asked to count, ``tokens`` tokens), uncached prefill tokens/s, first-token latency.

    Stream counts above what the server or client runs at once are not measured (they would
    queue). Each step reports one line through ``on_progress``.

    Raises:
        ValueError: ``streams`` < 1 or ``tokens`` < 16.
        AprError: the model stopped too early to time; or any failed call.
    """
    if streams < 1 or tokens < _MIN_DECODED:
        raise ValueError(f"streams = {streams}, tokens = {tokens}: need >= 1 and >= 16")
    say = on_progress or (lambda line: None)
    # Counting repeats digits: the client's loop guard must not cut it short.
    client = client.for_run(client.settings.model_copy(update={"stop_loops": False}))
    ask = functools.partial(client.chat, role="worker", temperature=0.0)
    report = await client.capacity_report()
    width = min(w for w in (streams, report.get("width"), report.get("limit")) if w)
    if width < streams:
        say(f"calibrate: this server or client runs {width} at once: no more streams are timed")

    # The latency first: its requests also warm up the connection and a lazily loaded model.
    minimal = [await ask(_unique("Say OK."), max_tokens=1) for _ in range(2)]
    first_token_s = min(_first_token_s(c) for c in minimal)
    say(f"calibrate: first token after {first_token_s:.3f} s (a minimal request)")

    decode: dict[int, float] = {}
    for k in sorted({1, min(2, width), width}):
        started = time.perf_counter()
        done = await asyncio.gather(*(ask(COUNT, max_tokens=tokens) for _ in range(k)))
        decode[k] = _aggregate_tps(done)
        gain = f" together, {decode[k] / decode[1]:.2f}x one stream" if k > 1 else ""
        say(
            f"calibrate: {k} stream{'s' if k > 1 else ''}: {decode[k]:.1f} tokens/s{gain} "
            f"({sum(c.completion_tokens for c in done)} tokens "
            f"in {time.perf_counter() - started:.1f} s)"
        )

    words = " ".join(random.choices(_VOCABULARY.split(), k=_PREFILL_WORDS))
    prefill = await ask(_unique(f"{words}\nReply with OK."), max_tokens=1)
    base_prompt = minimal[-1].prompt_tokens
    uncached = prefill.prompt_tokens - (prefill.cached_tokens or 0) - base_prompt
    seconds = _first_token_s(prefill) - first_token_s
    prefill_tps = uncached / seconds if uncached > 0 and seconds > 0.001 else None
    say(
        f"calibrate: prefill {prefill_tps:.0f} tokens/s ({uncached} uncached tokens in "
        f"{seconds:.2f} s)"
        if prefill_tps
        else "calibrate: prefill too fast to time"
    )
    return SpeedProfile(
        decode_tps=decode,
        prefill_tps=prefill_tps,
        first_token_s=first_token_s,
        source=f"apr calibrate, {datetime.now():%Y-%m-%d %H:%M}",
        weights=dict.fromkeys(decode, CALIBRATION_WEIGHT),
        first_token_weight=CALIBRATION_WEIGHT,
    )
