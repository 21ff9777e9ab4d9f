"""How many requests a server really runs at once, asked once, so the fan-out fits it.

- llama.cpp ``llama-server``: ``GET /props`` (``total_slots``), else ``GET /slots``.
- vLLM: ``GET /metrics`` (``vllm:num_requests_running`` + ``waiting`` say nothing of capacity,
  but ``max_num_seqs`` appears in ``vllm:cache_config_info`` / ``scheduler_config`` labels on
  recent versions).
- Ollama: nothing to ask (``OLLAMA_NUM_PARALLEL`` is server-side only).

Anything else, or any failure, means "unknown": the settings stand.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx

__all__ = ["probe_parallel_capacity", "server_root"]

_TIMEOUT_S = 3.0


def server_root(base_url: str) -> str:
    """``http://host:port`` of an OpenAI-compatible ``.../v1`` URL."""
    return re.sub(r"/v1/?$", "", base_url.rstrip("/"))


def _from_props(data: Any) -> int | None:
    if isinstance(data, dict):
        slots = data.get("total_slots")
        if isinstance(slots, int) and slots > 0:
            return slots
    return None


def _from_slots(data: Any) -> int | None:
    return len(data) if isinstance(data, list) and data else None


def _from_metrics(text: str) -> int | None:
    found = re.search(r'max_num_seqs="(\d+)"', text)
    return int(found.group(1)) if found else None


async def probe_parallel_capacity(base_url: str, api_key: str | None = None) -> int | None:
    """The number of sequences the server runs in parallel, or ``None`` if it does not say.

    The three endpoints are asked at once, within one short timeout, so a server that says
    nothing (or hangs) costs at most ``_TIMEOUT_S`` once per client.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    root = server_root(base_url)
    async with httpx.AsyncClient(timeout=_TIMEOUT_S, headers=headers) as http:

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
                value = parse(response.json())
            except ValueError:
                continue
            if value:
                return value
    return _from_metrics(metrics.text) if metrics is not None else None
