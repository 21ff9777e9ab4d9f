"""How many requests a server really runs at once, asked once, so the fan-out fits it.

What is probed, where (all at once, within one short timeout):

- llama.cpp ``llama-server``: ``GET /props`` (``total_slots``, and the per-slot context
  ``default_generation_settings.n_ctx``), else ``GET /slots`` (one entry per slot).
- vLLM: ``GET /metrics``. vLLM does not expose its scheduler's ``max_num_seqs``; its
  ``vllm:cache_config_info`` labels give the KV cache (``num_gpu_blocks`` x ``block_size``
  tokens), which is reported, but the width stays unknown.
- Ollama, LiteLLM, ``transformers serve``, OpenAI: nothing to ask; the width is unknown.

An unknown width leaves the settings' ``max_concurrency`` in charge.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["CapacityReport", "probe_parallel_capacity", "server_root"]

_TIMEOUT_S = 3.0
UNKNOWN = "not reported by the server"


@dataclass(frozen=True)
class CapacityReport:
    """What a server says about its capacity.

    Attributes:
        width: requests it runs at once, or ``None`` if it does not say.
        source: where ``width`` came from (or that nothing said).
        slot_context: tokens of context one request gets (llama.cpp ``n_ctx`` per slot).
        kv_cache_tokens: tokens the KV cache holds (vLLM).
    """

    width: int | None = None
    source: str = UNKNOWN
    slot_context: int | None = None
    kv_cache_tokens: int | None = None


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


async def probe_parallel_capacity(base_url: str, api_key: str | None = None) -> CapacityReport:
    """What the server says about its capacity (an empty report if it says nothing).

    The three endpoints are asked at once, within one short timeout, so a server that says
    nothing (or hangs) costs at most ``_TIMEOUT_S`` once per client.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    root = server_root(base_url)
    # Plain HTTP needs no TLS context (loading the CA bundle costs up to 0.2 s).
    verify = root.startswith("https://")
    async with httpx.AsyncClient(timeout=_TIMEOUT_S, headers=headers, verify=verify) as http:

        async def ask(path: str) -> httpx.Response | None:
            try:
                response = await http.get(root + path)
            except httpx.HTTPError:
                return None
            return response if response.status_code == 200 else None

        props, slots, metrics = await asyncio.gather(ask("/props"), ask("/slots"), ask("/metrics"))
    for response, parse in ((props, _from_props), (slots, _from_slots)):
        if response is not None:
            try:
                report = parse(response.json())
            except ValueError:
                continue
            if report is not None:
                return report
    found = _from_metrics(metrics.text) if metrics is not None else None
    return found or CapacityReport()
