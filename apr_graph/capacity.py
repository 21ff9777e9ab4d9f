"""How many requests a server really runs at once, asked once, so the fan-out fits it.

- llama.cpp: ``GET /props`` (``total_slots``, per-slot ``n_ctx``), else ``GET /slots``.
- vLLM: ``GET /metrics`` gives the KV cache size only (``max_num_seqs`` is not exposed), and
  ``GET /v1/models`` the context one request may fill (``max_model_len``).
- Ollama, LiteLLM, ``transformers serve``, OpenAI: nothing to ask.

An unknown width leaves the settings' ``max_concurrency`` in charge. The probe runs once per
client whatever event loops it serves (``ProbeOnce``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import re
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from apr_graph.http_pool import get_once

__all__ = ["CapacityReport", "ProbeOnce", "probe_parallel_capacity", "server_root"]

_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class CapacityReport:
    """What a server says about its capacity.

    Attributes:
        width: requests it runs at once, or ``None`` if it does not say.
        source: where ``width`` came from (or that nothing said).
        slot_context: tokens of context one request gets (llama.cpp ``n_ctx`` per slot, vLLM
            ``max_model_len``).
        kv_cache_tokens: tokens the KV cache holds (vLLM).
    """

    width: int | None = None
    source: str = "not reported by the server"
    slot_context: int | None = None
    kv_cache_tokens: int | None = None

    @property
    def slot_caches(self) -> bool:
        """Whether each of the server's slots keeps its own prompt cache (llama.cpp)."""
        return self.source.startswith("llama.cpp")


def server_root(base_url: str) -> str:
    """``http://host:port`` of an OpenAI-compatible ``.../v1`` URL."""
    return re.sub(r"/v1/?$", "", base_url.rstrip("/"))


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _from_props(data: Any) -> CapacityReport | None:
    if not isinstance(data, dict) or (slots := _positive(data.get("total_slots"))) is None:
        return None
    generation = data.get("default_generation_settings")
    context = _positive(generation.get("n_ctx")) if isinstance(generation, dict) else None
    return CapacityReport(slots, "llama.cpp /props total_slots", slot_context=context)


def _from_slots(data: Any) -> CapacityReport | None:
    if not isinstance(data, list) or not data:
        return None
    first = data[0] if isinstance(data[0], dict) else {}
    return CapacityReport(len(data), "llama.cpp /slots", slot_context=_positive(first.get("n_ctx")))


def _label(text: str, name: str) -> int | None:
    found = re.search(rf'vllm:cache_config_info\{{[^}}]*\b{name}="(\d+)"', text)
    return int(found.group(1)) if found else None


def _from_metrics(text: str) -> CapacityReport | None:
    blocks, block_size = _label(text, "num_gpu_blocks"), _label(text, "block_size")
    if blocks is None or block_size is None:
        return None
    return CapacityReport(
        None,
        "vLLM /metrics (KV cache only; max_num_seqs is not exposed)",
        kv_cache_tokens=blocks * block_size,
    )


def _from_models(data: Any) -> int | None:
    """The smallest ``max_model_len`` a ``/v1/models`` list gives (vLLM, SGLang)."""
    models = data.get("data") if isinstance(data, dict) else None
    lengths = [
        length
        for model in models or ()
        if isinstance(model, dict) and (length := _positive(model.get("max_model_len")))
    ]
    return min(lengths) if lengths else None


async def probe_parallel_capacity(base_url: str, api_key: str | None = None) -> CapacityReport:
    """What the server says about its capacity (an empty report if it says nothing).

    The endpoints are asked at once within one short timeout, so a silent or hung server
    costs at most ``_TIMEOUT_S`` per client; on the probe's own connections, closed after it,
    so the client's pool keeps only those its requests use.
    """
    root = server_root(base_url)
    urls = [root + path for path in ("/props", "/slots", "/metrics")]
    urls.append(base_url.rstrip("/") + "/models")
    # A failure (an exception in its place) says nothing: no ``_from_*`` reads one.
    props, slots, metrics, models = await get_once(urls, api_key, timeout_s=_TIMEOUT_S)
    found = _from_metrics(metrics) if isinstance(metrics, str) else None
    report = _from_props(props) or _from_slots(slots) or found or CapacityReport()
    if report.slot_context is None and (length := _from_models(models)) is not None:
        report = dataclasses.replace(report, slot_context=length)
    return report


class ProbeOnce:
    """A probe run once for all who ask, from any event loop.

    A caller that finds the probe under way (on its loop or another) waits for it, and runs
    it itself if the prober gave up (was cancelled) before the end.
    """

    def __init__(self) -> None:
        self.done = False
        self._running: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()

    async def run(self, probe: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``probe`` unless it ran (or wait for the run under way)."""
        while not self.done:
            with self._lock:
                running, mine = self._running, self._running is None
                if running is None:
                    running = self._running = concurrent.futures.Future()
            if not mine:
                # Set on any loop; shielded: cancelling this wait must not cancel the run.
                await asyncio.shield(asyncio.wrap_future(running))
                continue
            try:
                await probe()
                self.done = True
            finally:
                with self._lock:
                    self._running = None
                running.set_result(None)
