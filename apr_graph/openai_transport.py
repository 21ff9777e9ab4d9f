"""Requests to OpenAI-compatible servers: endpoints, their limits, probing, request shapes.

Each endpoint (``base_url`` plus any ``base_urls`` replicas) has its own SDK client (SDK
retries off) and its own adaptive limiter; a request goes to the least-loaded endpoint that is
not cooling down after refusing connections. The server's parallel capacity is probed once,
before the first request, and sizes each endpoint's limiter.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import openai

from apr_graph.capacity import CapacityReport, probe_parallel_capacity
from apr_graph.errors import ConfigurationError
from apr_graph.http_stream import AiohttpStreams, status_error, transport_error
from apr_graph.limiter import AdaptiveLimiter
from apr_graph.responses import (
    Completion,
    StreamEnd,
    StreamProgress,
    TransientResponseError,
    cached_tokens,
    choice_text,
    delta_text,
    estimate_tokens,
    prompt_estimate,
    read_stream,
    strip_reasoning,
    tool_calls_of,
    usage_counts,
)
from apr_graph.retry import CallBudget
from apr_graph.settings import AprSettings
from apr_graph.transport import ChatRequest, TextRequest, admit

__all__ = ["OpenAITransport"]

_COOLDOWN_S = 2.0
"""How long an endpoint that refused connections is avoided (while others are up)."""


_KEEPALIVE_S = 30.0
"""How long an idle connection is kept: a fan-out's connections serve the merge and the next
run's fan-out instead of being opened again."""


def _http_client(settings: AprSettings, base_url: str) -> Any:
    """The SDK's HTTP client with its pool sized to the concurrency actually used: as many
    kept-alive connections as requests may be in flight (the SDK keeps 100 for 5 s, so a
    256-wide fan-out opened 256 new ones every time). The limiter bounds connections.

    With aiohttp (``http_client``, by default when installed) the SDK's own aiohttp transport
    is under it: the same client and error types, much less client CPU per streamed request
    when hundreds are in flight (BENCHMARKS.md)."""
    aiohttp = _uses_aiohttp(settings)
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
        # aiohttp reads None as its default cap of 100 connections, 0 as no cap
        max_connections=0 if aiohttp else None,
        max_keepalive_connections=settings.max_concurrency,
        keepalive_expiry=_KEEPALIVE_S,
    )
    factory = openai.DefaultAioHttpClient if aiohttp else openai.DefaultAsyncHttpxClient
    if base_url.startswith("https://"):
        return factory(limits=limits)
    # Plain HTTP (a local or in-cluster server) needs no TLS context: building one per
    # client costs tens of milliseconds.
    return factory(limits=limits, verify=False)


def _uses_aiohttp(settings: AprSettings) -> bool:
    """Whether the endpoints run on aiohttp; asking for it without it installed is refused."""
    installed = importlib.util.find_spec("aiohttp") is not None
    if settings.http_client == "aiohttp" and not installed:
        raise ConfigurationError(
            "http_client='aiohttp' needs aiohttp: pip install 'openai[aiohttp]' "
            "(or set http_client='httpx' or 'auto')"
        )
    return installed and settings.http_client != "httpx"


class _Endpoint:
    """One server: its SDK client and its own adaptive limiter (they live on one loop)."""

    def __init__(self, settings: AprSettings, base_url: str) -> None:
        self.url = base_url
        self.http = _http_client(settings, base_url)
        self.client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=settings.api_key.get_secret_value(),
            max_retries=0,
            timeout=settings.request_timeout_s,
            http_client=self.http,
        )
        self.stream_headers = {
            **{k: v for k, v in self.client.default_headers.items() if isinstance(v, str)},
            **self.client.auth_headers,
            "Accept": "text/event-stream",
        }
        """The SDK's own headers (auth, user agent, organization), built once, not per request."""
        self._urls: dict[str, str] = {}
        self.streams = (
            AiohttpStreams(
                self.http,
                timeout_s=settings.request_timeout_s,
                https=base_url.startswith("https://"),
                keepalive_s=_KEEPALIVE_S,
            )
            if _uses_aiohttp(settings)
            else None
        )
        """Streamed requests on aiohttp directly (``None``: on the SDK's httpx client)."""
        self.limit = AdaptiveLimiter(settings.max_concurrency)
        self.down_until = 0.0
        self.streams_tools = True
        """False once the server refused a streamed request with tools (older llama.cpp)."""
        self.report = CapacityReport()

    def url_of(self, path: str) -> str:
        """The full URL of ``path`` under the endpoint's base URL, joined once per path."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = str(self.client.base_url.join(path.lstrip("/")))
        return url

    def load(self) -> float:
        return self.limit.in_flight / self.limit.limit

    async def send(self, request: Awaitable[Any]) -> Any:
        """Await one SDK request and teach this endpoint's limiter what happened: 429/503
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
    """The transport to one or more OpenAI-compatible servers (``settings.base_url(s)``).

    Args:
        settings: endpoints, API key, timeout, concurrency and probing.
    """

    def __init__(self, settings: AprSettings) -> None:
        if settings.base_url is None:
            raise ValueError("OpenAITransport needs settings.base_url")
        _uses_aiohttp(settings)  # refused when the graph is built, not at its first request
        self.settings = settings
        self.urls = list(dict.fromkeys([settings.base_url, *settings.base_urls]))
        self._endpoints: list[_Endpoint] = []
        self._probed = False
        self._probe_lock: asyncio.Lock | None = None

    @property
    def name(self) -> str:
        """The first endpoint's URL."""
        return self.urls[0]

    def _all(self) -> list[_Endpoint]:
        # Built on first use, on the client's loop, so each endpoint has one client and limiter.
        if not self._endpoints:
            self._endpoints.extend(_Endpoint(self.settings, url) for url in self.urls)
        return self._endpoints

    async def _pick(self) -> _Endpoint:
        """The least-loaded endpoint among those not cooling down (probed first, once)."""
        await self.capacity()
        now = time.monotonic()
        endpoints = self._all()
        up = [e for e in endpoints if e.down_until <= now] or endpoints
        return min(up, key=_Endpoint.load)

    async def capacity(self) -> int:
        """Requests the servers run at once: probed once (``probe_capacity``), else settings."""
        endpoints = self._all()
        if self._probe_lock is None:
            self._probe_lock = asyncio.Lock()
        async with self._probe_lock:
            if not self._probed:
                self._probed = True
                if self.settings.probe_capacity:
                    await asyncio.gather(*(self._probe(e) for e in endpoints))
                else:
                    for endpoint in endpoints:
                        endpoint.report = CapacityReport(source="not asked (probe_capacity off)")
        return sum(e.limit.maximum for e in endpoints)

    async def _probe(self, endpoint: _Endpoint) -> None:
        report = await probe_parallel_capacity(
            endpoint.url, self.settings.api_key.get_secret_value()
        )
        endpoint.report = report
        if report.width is None:
            return
        slots = report.width
        if "max_concurrency" in self.settings.model_fields_set:
            slots = min(slots, self.settings.max_concurrency)  # the user's cap still holds
        endpoint.limit.maximum = endpoint.limit.limit = slots

    def capacity_report(self) -> dict[str, Any]:
        """What probing found, over all endpoints: ``width`` (``None``: unknown), ``source``,
        ``limit`` (requests allowed in flight), and any ``slot_context`` / ``kv_cache_tokens``."""
        reports = [e.report for e in self._all()]
        widths = [r.width for r in reports]
        found: dict[str, Any] = {
            "width": None if None in widths else sum(w or 0 for w in widths),
            "source": "; ".join(dict.fromkeys(r.source for r in reports)),
            "limit": sum(e.limit.maximum for e in self._all()),
        }
        for name in ("slot_context", "kv_cache_tokens"):
            values = [getattr(r, name) for r in reports if getattr(r, name) is not None]
            if values:
                found[name] = min(values) if name == "slot_context" else sum(values)
        return found

    def concurrency_limit(self) -> int:
        """Requests currently allowed in flight, over all endpoints."""
        if not self._endpoints:
            return self.settings.max_concurrency * len(self.urls)
        return sum(e.limit.limit for e in self._endpoints)

    @property
    def requests_by_endpoint(self) -> dict[str, int]:
        """Requests in flight per endpoint URL."""
        return {e.url: e.limit.in_flight for e in self._endpoints}

    async def list_models(self) -> list[str]:
        """``GET /models`` of the first endpoint."""
        page = await self._all()[0].client.models.list()
        return [model.id async for model in page]

    async def aclose(self) -> None:
        """Close every endpoint's connections (they are rebuilt on next use)."""
        endpoints, self._endpoints = self._endpoints, []
        self._probed = False
        for endpoint in endpoints:
            if endpoint.streams is not None:
                await endpoint.streams.aclose()
            await endpoint.client.close()

    async def chat(
        self, request: ChatRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """One chat completion, streamed when the request asks (tool calls too: their
        deltas are assembled by ``read_stream``)."""
        endpoint = await self._pick()
        max_tokens = _fit(request.max_tokens, prompt_estimate(request.messages), endpoint)
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
            response = None
            if request.stream and (endpoint.streams_tools or not request.tools):
                response = await _stream_chat(endpoint, body, request)
            if response is not None:
                end = await read_stream(response, progress, delta_text)
                reply = _Reply.streamed(end, progress)
            else:
                reply = _unpack(await endpoint.send(_post(endpoint, body)))
            return reply.completion(
                request.model, prompt_estimate(request.messages), progress, budget
            )

    async def complete(
        self, request: TextRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """One streamed ``/v1/completions`` request ending at a stop string."""
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
            response = await endpoint.send(_post_stream(endpoint, "/completions", body))
            reply = _Reply.streamed(await read_stream(response, progress, choice_text), progress)
            reply.reasoning_kept = True  # a native reasoner's text is the whole point
            return reply.completion(request.model, prompt_tokens, progress, budget)


_STREAM = re.compile(r"\bstream", re.I)
"""In a refusal, the word that says streaming was the problem ("upstream ..." is not)."""


async def _stream_chat(endpoint: _Endpoint, body: dict[str, Any], request: ChatRequest) -> Any:
    """The unread response of a streamed chat request, or ``None`` when the server refuses
    to stream tool calls (llama.cpp before spring 2025: 500 "Cannot use tools with stream"):
    then the request goes unstreamed, now and from then on."""
    try:
        return await endpoint.send(_post_stream(endpoint, "/chat/completions", body))
    except openai.APIStatusError as exc:
        refused = exc.status_code in {400, 422, 500} and _STREAM.search(str(exc.message))
        if not (request.tools and refused):
            raise
        endpoint.streams_tools = False
        return None


async def _post_stream(endpoint: _Endpoint, path: str, body: dict[str, Any]) -> Any:
    """Send a streamed request and return the raw, unread HTTP response.

    The bulk path of a fan-out goes around the SDK's request pipeline (options, body
    transform, per-chunk models): on aiohttp to the endpoint's own aiohttp session
    (``http_stream``), on httpx to the SDK's HTTP client (its pool, headers, timeout).
    Failures still surface as the SDK's error types, so classification and retries see
    what the SDK would raise.
    """
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint.streams is not None:  # aiohttp, directly
        return await endpoint.streams.post(
            endpoint.url_of(path),
            json.dumps(payload, ensure_ascii=False).encode(),
            endpoint.stream_headers,
        )
    request = endpoint.http.build_request(
        "POST",
        endpoint.url_of(path),
        content=json.dumps(payload, ensure_ascii=False).encode(),
        headers=endpoint.stream_headers,
        timeout=endpoint.client.timeout,
    )
    try:
        response = await endpoint.http.send(request, stream=True)
    except Exception as exc:
        raise transport_error(exc, request) from exc
    if response.status_code >= 400:
        try:
            await response.aread()
        except Exception as exc:
            raise transport_error(exc, request) from exc
        finally:
            await response.aclose()
        raise status_error(response)
    return response


async def _post(endpoint: _Endpoint, body: dict[str, Any]) -> Any:
    """A non-streamed chat request, parsed by the SDK."""
    return await endpoint.client.post(
        "/chat/completions", body=body, cast_to=openai.types.chat.ChatCompletion
    )


_CONTEXT_MARGIN = 32
"""Tokens kept free in a slot's context: the prompt's size is an estimate."""


def _fit(max_tokens: int, prompt_tokens: int, endpoint: _Endpoint) -> int:
    """``max_tokens`` lowered to what the server's per-slot context leaves after the prompt
    (llama.cpp refuses a request whose prompt plus allowance does not fit)."""
    context = endpoint.report.slot_context
    if context is None:
        return max_tokens
    return max(16, min(max_tokens, context - prompt_tokens - _CONTEXT_MARGIN))


@dataclass
class _Reply:
    """What one reply carried, streamed or not."""

    text: str
    finish_reason: str | None
    usage: Any
    timings: Any = None
    tool_calls: tuple[dict[str, str], ...] = ()
    stop_reason: str | None = None
    counted: int | None = None
    """Completion tokens as the client counted them (used when the server reports no usage)."""
    reasoning_kept: bool = False

    @classmethod
    def streamed(cls, end: StreamEnd, progress: StreamProgress) -> _Reply:
        """The reply a stream produced."""
        return cls(
            progress.text,
            end.finish_reason,
            end.usage,
            end.timings,
            tool_calls=end.tool_calls,
            stop_reason=end.stop_reason,
            counted=progress.completion_tokens,
        )

    def completion(
        self, model: str, prompt_guess: int, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """The ``Completion``, its tokens charged to ``budget`` (call it before the
        concurrency slot is released, so a budget is never overshot by more than the
        requests in flight)."""
        counted = estimate_tokens(self.text) if self.counted is None else self.counted
        prompt, completion = usage_counts(self.usage, prompt=prompt_guess, completion=counted)
        if budget is not None:
            progress.charged = True  # before charging: the charge may stop the run
            budget.charge(prompt + completion)
        return Completion(
            text=self.text if self.reasoning_kept else strip_reasoning(self.text),
            finish_reason=self.finish_reason,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached_tokens(self.usage, self.timings),
            requests=1,
            started_at=progress.started_at,
            ended_at=time.time(),
            model=model,
            tool_calls=self.tool_calls,
            stop_reason=self.stop_reason,
            first_token_at=progress.first_token_at,
        )


def _unpack(result: Any) -> _Reply:
    """The reply of a non-streamed chat completion."""
    if not isinstance(result, openai.types.chat.ChatCompletion):
        snippet = str(result)[:120]
        raise TransientResponseError(f"the server did not return a completion: {snippet!r}")
    if not result.choices:
        raise TransientResponseError("the server returned no choices")
    choice = result.choices[0]
    message = choice.message
    return _Reply(
        message.content or "",
        choice.finish_reason,
        result.usage,
        (result.model_extra or {}).get("timings"),
        tool_calls=tool_calls_of(message),
    )
