"""Requests to OpenAI-compatible servers: endpoints, their limits, probing, request shapes.

Each endpoint (``base_url`` plus any ``base_urls`` replicas) has its own adaptive limiter; a
request goes to the least-loaded endpoint that is not cooling down after refusing connections.
The servers' parallel capacity is probed once, before the first request, and sizes the
limiters. Limiters, probe results and what a server refused are shared by every event loop;
connections are per loop (``http_pool``), and requests run in ``http_pool.isolated`` tasks.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import openai

from apr_graph.callbacks import reported
from apr_graph.capacity import CapacityReport, ProbeOnce, probe_parallel_capacity
from apr_graph.http_pool import HttpPool, isolated
from apr_graph.limiter import AdaptiveLimiter
from apr_graph.responses import (
    Completion,
    Reply,
    StreamProgress,
    TransientResponseError,
    estimate_tokens,
    prompt_estimate,
    tool_calls_of,
)
from apr_graph.retry import CallBudget
from apr_graph.sdk_compat import sdk_headers
from apr_graph.settings import AprSettings
from apr_graph.sse import choice_text, delta_text, read_stream
from apr_graph.transport import ChatRequest, TextRequest, admit

__all__ = ["OpenAITransport"]

T = TypeVar("T")

_CHAT = "/chat/completions"
_COOLDOWN_S = 2.0
"""How long an endpoint that refused connections is avoided (while others are up)."""

_KEEPALIVE_S = 30.0
"""How long an idle connection is kept: a fan-out's connections serve the merge and the next
run's fan-out instead of being opened again."""


class _Endpoint:
    """One server: its URL, headers and adaptive limiter (shared by every loop)."""

    def __init__(self, settings: AprSettings, base_url: str) -> None:
        self.url = base_url
        headers = sdk_headers(settings.api_key.get_secret_value())
        self.stream_headers = {**headers, "Accept": "text/event-stream"}
        self.json_headers = {**headers, "Accept": "application/json"}
        base = base_url.rstrip("/")
        self.urls = {path: base + path for path in ("/models", _CHAT, "/completions")}
        self.limit = AdaptiveLimiter(settings.max_concurrency)
        self.down_until = 0.0
        self.streams_tools = True
        """False once the server refused a streamed request with tools (older llama.cpp)."""
        self.report = CapacityReport()
        self.settle_until = 0.0
        """Until when a stream closed mid-reply may still hold its llama.cpp slot."""

    def load(self) -> float:
        return self.limit.in_flight / self.limit.limit

    async def settled(self) -> None:
        """Wait out a stream closed mid-reply a moment ago on llama.cpp: the server frees its
        slot at its next token, and a request sent before lands on another slot, whose cache
        lacks the prompt (a retry re-read 1,057 tokens: 31 s on 2 busy cores, against 2.6 s
        when sent 0.3 s later)."""
        if (wait := self.settle_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    async def send(self, request: Awaitable[T]) -> T:
        """Await one request and teach this endpoint's limiter what happened: 429/503
        shrink it, success grows it, a refused connection sets the endpoint aside a while."""
        try:
            result = await request
        except openai.APIStatusError as exc:
            if exc.status_code in {429, 503}:
                self.limit.overloaded()
            raise
        except openai.APIConnectionError:
            self.down_until = time.monotonic() + _COOLDOWN_S
            raise
        self.limit.succeeded()
        return result


class OpenAITransport:
    """The transport to one or more OpenAI-compatible servers (``settings``: endpoints, API
    key, timeout, concurrency and probing)."""

    def __init__(self, settings: AprSettings) -> None:
        if settings.base_url is None:
            raise ValueError("OpenAITransport needs settings.base_url")
        self.settings = settings
        self.urls = list(dict.fromkeys([settings.base_url, *settings.base_urls]))
        self._endpoints = [_Endpoint(settings, url) for url in self.urls]
        self.pool = HttpPool(
            timeout_s=settings.request_timeout_s,
            https=any(url.startswith("https://") for url in self.urls),
            keepalive_s=_KEEPALIVE_S,
        )
        self._probed = ProbeOnce()

    @property
    def name(self) -> str:
        """The first endpoint's URL."""
        return self.urls[0]

    async def _pick(self) -> _Endpoint:
        """The least-loaded endpoint among those not cooling down (probed first, once)."""
        if not self._probed.done:
            await self.capacity()
        now = time.monotonic()
        endpoints = self._endpoints
        up = [e for e in endpoints if e.down_until <= now] or endpoints
        return min(up, key=_Endpoint.load)

    async def capacity(self) -> int:
        """Requests the servers run at once: probed once (``probe_capacity``), else settings;
        once for the transport, whatever loops ask (``ProbeOnce``)."""
        await self._probed.run(lambda: isolated(self._probe_all()))
        return sum(e.limit.maximum for e in self._endpoints)

    async def _probe_all(self) -> None:
        settings = self.settings
        if not settings.probe_capacity:
            for endpoint in self._endpoints:
                endpoint.report = CapacityReport(source="not asked (probe_capacity off)")
            return
        key = settings.api_key.get_secret_value()
        reports = await asyncio.gather(
            *(probe_parallel_capacity(e.url, key) for e in self._endpoints)
        )
        for endpoint, report in zip(self._endpoints, reports, strict=True):
            endpoint.report = report
            if report.width is None:
                continue
            slots = report.width
            if "max_concurrency" in settings.model_fields_set:
                slots = min(slots, settings.max_concurrency)  # the user's cap still holds
            endpoint.limit.resize(slots)

    def capacity_report(self) -> dict[str, Any]:
        """What probing found, over all endpoints: ``width`` (``None``: unknown), ``source``,
        ``limit`` (requests allowed in flight), and any ``slot_context`` / ``kv_cache_tokens``."""
        reports = [e.report for e in self._endpoints]
        widths = [r.width for r in reports]
        found: dict[str, Any] = {
            "width": None if None in widths else sum(w or 0 for w in widths),
            "source": "; ".join(dict.fromkeys(r.source for r in reports)),
            "limit": sum(e.limit.maximum for e in self._endpoints),
        }
        for name, fold in (("slot_context", min), ("kv_cache_tokens", sum)):
            if values := [getattr(r, name) for r in reports if getattr(r, name) is not None]:
                found[name] = fold(values)
        return found

    def concurrency_limit(self) -> int:
        """Requests currently allowed in flight, over all endpoints."""
        return sum(e.limit.limit for e in self._endpoints)

    async def list_models(self) -> list[str]:
        """``GET /models`` of the first endpoint."""
        endpoint = self._endpoints[0]
        fetched = self.pool.fetch("GET", endpoint.urls["/models"], endpoint.json_headers)
        page = await isolated(fetched)
        listed = page.get("data") if isinstance(page, dict) else None
        if not isinstance(listed, list):
            raise TransientResponseError(f"the server did not list models: {str(page)[:120]!r}")
        return [str(m["id"]) for m in listed if isinstance(m, dict) and "id" in m]

    async def aclose(self) -> None:
        """Close the connections, on every loop that has some (reopened on next use)."""
        await self.pool.aclose()

    async def chat(
        self, request: ChatRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """One chat completion, streamed when the request asks (tool calls too: their
        deltas are assembled by ``read_stream``), reported to the callback handlers of the
        node that sends it (``callbacks``)."""
        return await reported(
            request, progress, lambda: isolated(self._chat(request, progress, budget))
        )

    async def _chat(
        self, request: ChatRequest, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        endpoint = await self._pick()
        prompt_tokens = prompt_estimate(request.messages)
        max_tokens = _fit(request.max_tokens, prompt_tokens, endpoint)
        body: dict[str, Any] = {
            "model": request.model,
            "messages": list(request.messages),
            "max_tokens": max_tokens,
            "temperature": request.temperature,
        }
        if request.response_format is not None:
            body["response_format"] = request.response_format
        if request.tools:
            body["tools"] = list(request.tools)
        async with endpoint.limit:
            admit(budget)
            progress.restart(time.time())  # sent only once a slot is free
            reply = None
            if request.stream and (endpoint.streams_tools or not request.tools):
                try:
                    reply = await self._streamed(endpoint, _CHAT, body, progress, delta_text)
                except openai.APIStatusError as exc:
                    # Older llama.cpp refuses to stream tool calls (500 "Cannot use tools with
                    # stream"): such requests then go unstreamed, now and from then on.
                    refused = exc.status_code in {400, 422, 500} and _STREAM.search(exc.message)
                    if not (request.tools and refused):
                        raise
                    endpoint.streams_tools = False
            if reply is None:
                url, headers = endpoint.urls[_CHAT], endpoint.json_headers
                fetched = self.pool.fetch("POST", url, headers, _dumps(body))
                reply = _unpack(await endpoint.send(fetched))
            completion = reply.completion(request.model, prompt_tokens, progress, budget)
            if max_tokens < request.max_tokens:  # the context, not the caller, set the limit
                completion = replace(completion, max_tokens_sent=max_tokens)
            return completion

    async def complete(
        self, request: TextRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """One streamed ``/v1/completions`` request ending at a stop string (reported as
        ``chat`` is)."""
        return await reported(
            request, progress, lambda: isolated(self._complete(request, progress, budget))
        )

    async def _complete(
        self, request: TextRequest, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        endpoint = await self._pick()
        prompt_tokens = estimate_tokens(request.prompt)
        body = {
            "model": request.model,
            "prompt": request.prompt,
            "max_tokens": _fit(request.max_tokens, prompt_tokens, endpoint),
            "temperature": request.temperature,
            "stop": list(request.stop) or None,
            **request.extra_body,
        }
        async with endpoint.limit:
            admit(budget)
            progress.restart(time.time())
            reply = await self._streamed(endpoint, "/completions", body, progress, choice_text)
            reply.reasoning_kept = True  # a native reasoner's text is the whole point
            return reply.completion(request.model, prompt_tokens, progress, budget)

    async def _streamed(
        self,
        endpoint: _Endpoint,
        path: str,
        body: dict[str, Any],
        progress: StreamProgress,
        piece_of: Callable[[Any], str | None],
    ) -> Reply:
        """Send a streamed request (``_Endpoint.send``) and read its reply into ``progress``."""
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        await endpoint.settled()
        sent = self.pool.stream(endpoint.urls[path], _dumps(payload), endpoint.stream_headers)
        response = await endpoint.send(sent)
        try:
            end = await read_stream(response, progress, piece_of)
        finally:
            if response.cut and endpoint.report.slot_caches:
                endpoint.settle_until = time.monotonic() + _SETTLE_S
        return Reply(
            progress.text,
            end.finish_reason,
            end.usage,
            end.timings,
            tool_calls=end.tool_calls,
            stop_reason=end.stop_reason,
            counted=progress.completion_tokens,
        )


_STREAM = re.compile(r"\bstream", re.I)
"""In a refusal, the word that says streaming was the problem ("upstream ..." is not)."""


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


_SETTLE_S = 0.3
"""How long llama.cpp may take to free the slot of a stream closed mid-reply."""

_CONTEXT_MARGIN = 32
"""Tokens kept free in a slot's context: the prompt's size is an estimate."""


def _fit(max_tokens: int, prompt_tokens: int, endpoint: _Endpoint) -> int:
    """``max_tokens`` lowered to what the server's per-slot context leaves after the prompt
    (llama.cpp refuses a request whose prompt plus allowance does not fit)."""
    context = endpoint.report.slot_context
    if context is None:
        return max_tokens
    return max(16, min(max_tokens, context - prompt_tokens - _CONTEXT_MARGIN))


def _unpack(result: Any) -> Reply:
    """The reply of a non-streamed chat completion (its JSON body)."""
    if not isinstance(result, dict) or "choices" not in result:
        snippet = str(result)[:120]
        raise TransientResponseError(f"the server did not return a completion: {snippet!r}")
    choices = result["choices"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TransientResponseError("the server returned no choices")
    choice = choices[0]
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content = message.get("content")
    return Reply(
        content if isinstance(content, str) else "",
        choice.get("finish_reason"),
        result.get("usage"),
        result.get("timings"),
        tool_calls=tool_calls_of(message),
    )
