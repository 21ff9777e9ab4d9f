"""A latency-faithful simulated GPU server, for measuring orchestration itself.

It speaks the OpenAI protocol like ``ScriptedServer`` (replies come from a function of the
request), and releases tokens the way a GPU server with continuous batching would:

- one decode step emits one token for every running sequence; a step takes
  ``step_s * (1 + batch_slowdown * (running - 1))``, so bigger batches are slower per step
  but far faster in total;
- a new sequence first pays prefill: ``prefill_s_per_token`` for each prompt token that is
  not in the prefix cache (blocks of ``block`` tokens, as vLLM caches them). On a GPU
  (``prefill_chunk=0``) prefill runs beside the decode steps and costs the decoders nothing;
  on a CPU (``prefill_chunk=N``) compute is shared, as llama.cpp shares it: each step also
  processes up to N prompt tokens, and the step lasts that much longer for everyone;
- at most ``slots`` sequences run at once; the rest wait in line;
- a client that hangs up frees its slot at once (the server stops generating).

Tokens are words. Defaults (``LatencyModel.gpu()``) resemble an 8B model on one modern GPU:
20 ms per decode step, about 3 ms per 100 uncached prompt tokens, 64 slots.
``LatencyModel.cpu()`` is a 1.5B model on a 2-core CPU with llama-server's 4 slots.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from apr_graph.testing.script import Pacer, RecordedRequest, Reply, Rule
from apr_graph.testing.server import ScriptedServer

__all__ = ["LatencyModel", "SimulatedServer"]


@dataclass(frozen=True)
class LatencyModel:
    """The timing of the simulated server.

    With ``n`` sequences decoding, the aggregate rate is ``n / (1 + batch_slowdown * (n - 1))``
    times one sequence's: about ``n`` on a GPU (``batch_slowdown`` near 0), little more than
    1 on a CPU, where each sequence's weights pass is paid again.
    """

    step_s: float = 0.02
    batch_slowdown: float = 0.01
    prefill_s_per_token: float = 0.00003
    slots: int = 64
    block: int = 16
    prefill_chunk: int = 0
    """0: prefill overlaps decoding (a GPU); N: each step also processes up to N prompt
    tokens and lasts that much longer (a CPU, llama.cpp's ``n_batch``)."""

    @classmethod
    def gpu(cls, scale: float = 1.0) -> LatencyModel:
        """An 8B model on one modern GPU: 50 tokens/s per stream, batching nearly free
        (3.9x the tokens/s at 4 streams), prefill ~33,000 tokens/s, 64 slots. ``scale``
        divides every time (``scale=20``: twenty times faster, for tests)."""
        return cls(step_s=0.02 / scale, prefill_s_per_token=0.00003 / scale)

    @classmethod
    def cpu(cls, scale: float = 1.0) -> LatencyModel:
        """A 1.5B model on a 2-core CPU with llama-server ``-np 4``: 23 tokens/s for one
        stream, 1.21x that at 2 streams and 1.37x at 4, prefill ~150 tokens/s that stalls
        the decoders, 4 slots. ``scale`` divides every time."""
        return cls(
            step_s=1 / 23 / scale,
            batch_slowdown=0.64,
            prefill_s_per_token=1 / 150 / scale,
            slots=4,
            prefill_chunk=2048,
        )

    def step_time(self, running: int) -> float:
        """Seconds one decode step takes with ``running`` sequences."""
        return self.step_s * (1 + self.batch_slowdown * max(0, running - 1))


@dataclass
class _Sequence:
    prefill_left_s: float
    emitted: int = 0
    closed: bool = False


@dataclass
class _Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    steps: int = 0
    peak_batch: int = 0


class _Scheduler:
    """Continuous batching in real time, in its own thread."""

    def __init__(self, model: LatencyModel) -> None:
        self.model = model
        self.waiting: list[_Sequence] = []
        self.running: list[_Sequence] = []
        self.cache: set[bytes] = set()
        self.stats = _Stats()
        self.cv = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="sim-gpu", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[str]) -> _Sequence:
        blocks = [
            hashlib.blake2b("\x1f".join(prompt[:end]).encode(), digest_size=16).digest()
            for end in range(self.model.block, len(prompt) + 1, self.model.block)
        ]
        cached = 0
        with self.cv:
            for digest in blocks:
                if digest not in self.cache:
                    break
                cached += self.model.block
            self.cache.update(blocks)
            self.stats.prompt_tokens += len(prompt)
            self.stats.cached_tokens += cached
            sequence = _Sequence((len(prompt) - cached) * self.model.prefill_s_per_token)
            self.waiting.append(sequence)
            self.cv.notify_all()
        return sequence

    def wait(self, sequence: _Sequence, tokens: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: sequence.emitted >= tokens or self.stopped)

    def close(self, sequence: _Sequence) -> None:
        with self.cv:
            sequence.closed = True
            if sequence in self.running:
                self.running.remove(sequence)
            if sequence in self.waiting:
                self.waiting.remove(sequence)
            self.cv.notify_all()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.running or self.waiting or self.stopped)
                if self.stopped:
                    return
                while self.waiting and len(self.running) < self.model.slots:
                    self.running.append(self.waiting.pop(0))
                batch = len(self.running)
                self.stats.peak_batch = max(self.stats.peak_batch, batch)
                if self.model.prefill_chunk:
                    step, shares = self._shared_step()
                else:
                    step, shares = self.model.step_time(batch), {}
            time.sleep(step)
            with self.cv:
                self.stats.steps += 1
                for sequence in self.running:
                    if self.model.prefill_chunk:
                        self._advance_shared(sequence, shares)
                    elif sequence.prefill_left_s > 0:
                        sequence.prefill_left_s -= step
                    else:
                        sequence.emitted += 1
                self.cv.notify_all()

    def _shared_step(self) -> tuple[float, dict[int, float]]:
        """A CPU step (lock held): one token for each decoding sequence, plus up to
        ``prefill_chunk`` prompt tokens of the sequences in prefill, first come first served.
        Returns its length and each prefilling sequence's prefill seconds in it (by ``id``)."""
        room = self.model.prefill_chunk * self.model.prefill_s_per_token
        shares: dict[int, float] = {}
        for sequence in self.running:
            if sequence.prefill_left_s > 0 and room > 0:
                shares[id(sequence)] = min(sequence.prefill_left_s, room)
                room -= shares[id(sequence)]
        decoding = sum(1 for s in self.running if s.prefill_left_s <= 0)
        decode_s = self.model.step_time(decoding) if decoding else 0.0
        return decode_s + sum(shares.values()), shares

    @staticmethod
    def _advance_shared(sequence: _Sequence, shares: dict[int, float]) -> None:
        if sequence.prefill_left_s <= 0:
            sequence.emitted += 1
        elif id(sequence) in shares:
            sequence.prefill_left_s -= shares[id(sequence)]
            if sequence.prefill_left_s <= 1e-12:  # the prompt's last logits give a token
                sequence.prefill_left_s = 0.0
                sequence.emitted += 1


class _SimPacer(Pacer):
    def __init__(self, scheduler: _Scheduler, sequence: _Sequence) -> None:
        self.scheduler = scheduler
        self.sequence = sequence

    def wait(self, tokens: int) -> None:
        self.scheduler.wait(self.sequence, tokens)

    def __exit__(self, *exc: object) -> None:
        self.scheduler.close(self.sequence)


class SimulatedServer(ScriptedServer):
    """An OpenAI-compatible loopback server with GPU-like timing.

    Args:
        reply: the content of each reply, as a function of the request.
        latency: the timing model.
        **kwargs: as for ``ScriptedServer`` (models, api_key, ...).
    """

    def __init__(
        self,
        reply: Callable[[RecordedRequest], Reply],
        *,
        latency: LatencyModel | None = None,
        rules: Iterable[Rule] = (),
        **kwargs: object,
    ) -> None:
        super().__init__([*rules, Rule(reply=reply)], **kwargs)  # type: ignore[arg-type]
        self.latency = latency or LatencyModel()
        self._scheduler: _Scheduler | None = None

    def start(self) -> SimulatedServer:
        self._scheduler = _Scheduler(self.latency)
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        if self._scheduler is not None:
            self._scheduler.stop()

    @property
    def stats(self) -> dict[str, int]:
        """Prompt tokens, prefix-cache hits, decode steps and the largest batch so far."""
        stats = self._scheduler.stats if self._scheduler else _Stats()
        return dict(vars(stats))

    def pace(self, request: RecordedRequest, reply: Reply) -> Pacer:
        assert self._scheduler is not None
        prompt: list[str] = []
        for message in request.messages:
            prompt.append(f"<{message.get('role')}>")
            prompt.extend(str(message.get("content", "")).split())
        if not request.messages:  # a text completion
            prompt = request.prompt.split()
        return _SimPacer(self._scheduler, self._scheduler.submit(prompt))
