"""The one place that talks to OpenAI-compatible servers.

- ``AsyncOpenAI(max_retries=0)``: the SDK never retries; one tenacity layer here decides, and
  retries only what is worth retrying (connection errors, timeouts, 408, 409, 429, 5xx,
  malformed or empty responses), honouring ``Retry-After``. 400/401/403/404 fail at once.
- Structured output that works on every common backend: ``json_schema``, then
  ``{"type": "json_object", "schema": ...}`` (llama-cpp-python's server), then the schema in
  the prompt; every answer is parsed and validated, and an invalid one is re-asked with the
  error shown to the model. What worked is remembered per endpoint and model.
- ``<think>...</think>`` reasoning is stripped; a JSON answer cut off by ``length`` is an error.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

import openai
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from apr_graph._portal import Portal
from apr_graph.capacity import probe_parallel_capacity
from apr_graph.errors import (
    AuthenticationError,
    BudgetExhaustedError,
    ConfigurationError,
    ModelCallError,
    ModelNotFoundError,
    ServerUnreachableError,
    StructuredOutputError,
)
from apr_graph.limiter import AdaptiveLimiter
from apr_graph.prompts import repair_message, schema_instruction
from apr_graph.settings import AprSettings, Role

__all__ = ["Completion", "LLMClient", "StructuredMode", "extract_json", "strip_reasoning"]

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")
StructuredMode = Literal["json_schema", "json_object", "prompt"]
Message = dict[str, Any]

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_MODE_CHAIN: tuple[StructuredMode, ...] = ("json_schema", "json_object", "prompt")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.I)


@dataclass(frozen=True)
class Completion:
    """The outcome of one logical model call (its retries and re-asks included).

    Attributes:
        text: the answer, reasoning stripped.
        finish_reason: as the server reported it.
        prompt_tokens / completion_tokens: summed over every request of the call.
        cached_tokens: prompt tokens the server served from its prefix cache, when it says.
        requests: HTTP requests sent.
        started_at / ended_at: wall-clock times (``time.time()``).
        mode: how structured output was obtained, or ``text``.
        tool_calls: the tools the model asked to call (``id``, ``name``, ``arguments`` JSON).
    """

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None
    requests: int
    started_at: float
    ended_at: float
    model: str
    mode: str = "text"
    tool_calls: tuple[dict[str, str], ...] = ()
    stop_reason: str | None = None

    def plus(self, other: Completion) -> Completion:
        """This call and a follow-up (a re-ask) as one call: tokens and requests summed."""
        cached: int | None = None
        if self.cached_tokens is not None or other.cached_tokens is not None:
            cached = (self.cached_tokens or 0) + (other.cached_tokens or 0)
        return replace(
            other,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=cached,
            requests=self.requests + other.requests,
            started_at=self.started_at,
        )


@dataclass
class StreamProgress:
    """What a streamed call has produced so far; readable after it is cancelled.

    Attributes:
        text: the content received so far (reasoning not stripped).
        completion_tokens: content deltas received (about one token each).
        started_at: when the current request was sent (``time.time()``); 0 if it never was
            (it was still waiting for a concurrency slot).
        requests: requests sent so far, retries included.
        charged: the answer was complete and its tokens were charged to the call's budget.
        on_text: called with each piece of text as it arrives (on the client's loop).
    """

    text: str = ""
    completion_tokens: int = 0
    started_at: float = 0.0
    requests: int = 0
    charged: bool = False
    on_text: Callable[[str], None] | None = None

    def add(self, piece: str) -> None:
        """One more piece of streamed text."""
        self.text += piece
        self.completion_tokens += 1
        if self.on_text is not None:
            self.on_text(piece)


@dataclass
class _StreamEnd:
    finish_reason: str | None = None
    stop_reason: str | None = None
    usage: Any = None


async def _read_stream(
    response: Any, progress: StreamProgress, piece_of: Callable[[Any], str | None]
) -> _StreamEnd:
    """Read a streamed response into ``progress``. Leaving, normally or by cancellation,
    closes the HTTP response, so the server stops generating."""
    end = _StreamEnd()
    async with response as chunks:
        try:
            async for chunk in chunks:
                end.usage = getattr(chunk, "usage", None) or end.usage
                for choice in getattr(chunk, "choices", None) or []:
                    piece = piece_of(choice)
                    if piece:
                        progress.add(piece)
                    end.finish_reason = getattr(choice, "finish_reason", None) or end.finish_reason
                    extra = getattr(choice, "model_extra", None) or {}
                    found = extra.get("stop_reason") or extra.get("stopping_word")
                    if isinstance(found, str):
                        end.stop_reason = found
        except (openai.APIError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the transport broke mid-stream: worth a retry
            raise _TransientResponseError(
                f"the stream broke after {progress.completion_tokens} tokens: {type(exc).__name__}"
            ) from exc
    if end.finish_reason is None:
        raise _TransientResponseError(
            f"the stream ended without a finish_reason after {progress.completion_tokens} "
            "tokens (cut off)"
        )
    return end


def _delta_text(choice: Any) -> str | None:
    return getattr(getattr(choice, "delta", None), "content", None)


def _choice_text(choice: Any) -> str | None:
    return getattr(choice, "text", None)


class CallBudget(Protocol):
    """What a run's budget offers the client: may a request go out, and what did it cost."""

    def admits(self) -> bool:
        """Whether a new request may be sent now."""
        ...

    def charge(self, tokens: int) -> None:
        """Count the tokens of one answered request (thread-safe)."""
        ...

    def remaining_s(self) -> float | None:
        """Seconds left before the run's deadline, if it has one."""
        ...


def _admit(budget: CallBudget | None) -> None:
    if budget is not None and not budget.admits():
        raise BudgetExhaustedError("the run's budget ran out before this request was sent")


def _prompt_estimate(messages: Sequence[Message]) -> int:
    # Some servers omit usage; an estimate (4 chars a token) beats a silent zero.
    return sum(len(m.get("content", "")) for m in messages) // 4


class _TransientResponseError(Exception):
    """A 200 response that carries no usable completion (empty choices, broken body)."""


class _ModeRejectedError(Exception):
    """The server refused a ``response_format`` type (carries the spent ``Completion``)."""


class _FormatRefusedError(Exception):
    """A request carrying ``response_format`` was refused for it: never worth retrying."""

    def __init__(self, cause: openai.APIStatusError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _refuses_format(exc: openai.APIStatusError) -> bool:
    # Servers without a mode answer 400/422/501, and llama-cpp-python's answers 500 with a
    # validation error about response_format; none of them will change their mind.
    if exc.status_code in {400, 422, 501}:
        return True
    return exc.status_code >= 500 and "response_format" in str(exc.message)


def strip_reasoning(text: str) -> str:
    """Remove ``<think>...</think>`` blocks (and an unclosed leading one) from ``text``."""
    text = _THINK.sub("", text)
    if text.lstrip().lower().startswith("<think>"):
        return ""
    return text.strip()


def extract_json(text: str) -> Any:
    """Parse the first JSON object in ``text`` (code fences and prose around it tolerated)."""
    cleaned = _FENCE.sub("", text.strip())
    start = cleaned.find("{")
    if start < 0:
        raise ValueError("the reply contains no JSON object")
    value, _ = json.JSONDecoder().raw_decode(cleaned[start:])
    return value


def _retry_after_s(exc: BaseException | None) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError | _TransientResponseError):
        return True  # includes APITimeoutError
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRYABLE_STATUS or exc.status_code >= 500
    return False


class _StopIfWaitTooLong(stop_base):
    """Stop when the server asks for a longer pause than allowed, or than the run has left:
    fail fast instead of sleeping past the deadline."""

    def __init__(self, max_wait_s: float, budget: CallBudget | None = None) -> None:
        self.max_wait_s = max_wait_s
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        delay = _retry_after_s(outcome.exception())
        if delay is None:
            return False
        remaining = self.budget.remaining_s() if self.budget is not None else None
        return delay > self.max_wait_s or (remaining is not None and delay > remaining)


_COOLDOWN_S = 2.0
"""How long an endpoint that refused connections is avoided (while others are up)."""


class _Endpoint:
    """One server: its SDK client and its own adaptive limiter (they live on the portal loop)."""

    def __init__(self, settings: AprSettings, base_url: str) -> None:
        self.url = base_url
        self.client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=settings.api_key.get_secret_value(),
            max_retries=0,
            timeout=settings.request_timeout_s,
        )
        self.limit = AdaptiveLimiter(settings.max_concurrency)
        self.down_until = 0.0
        self.probed_slots: int | None = None

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


def _pick(endpoints: list[_Endpoint]) -> _Endpoint:
    """The least-loaded endpoint among those not cooling down after a connection failure."""
    now = time.monotonic()
    up = [e for e in endpoints if e.down_until <= now] or endpoints
    return min(up, key=_Endpoint.load)


async def _close_all(endpoints: list[_Endpoint]) -> None:
    for endpoint in endpoints:
        await endpoint.client.close()


def _release(portal: Portal, holder: list[_Endpoint], *, wait: bool = False) -> None:
    endpoints = list(holder)
    holder.clear()
    portal.shutdown(_close_all(endpoints) if endpoints else None, wait=wait)


class LLMClient:
    """An OpenAI-compatible chat client with one retry layer and robust structured output.

    One instance serves a whole graph; it may be shared by concurrent runs, threads and event
    loops: every request runs on the client's own background loop. ``close()`` it (or use it
    as a context manager) when done, to release its connections.

    Args:
        settings: endpoint, models, limits and retries.
    """

    def __init__(self, settings: AprSettings) -> None:
        if settings.base_url is None:
            raise ConfigurationError(
                "no model server configured: pass AprSettings(base_url=...) or set "
                "OPENAI_BASE_URL (e.g. http://localhost:8000/v1 for vLLM, "
                "http://localhost:11434/v1 for Ollama)"
            )
        self.settings = settings
        self.base_url: str = settings.base_url
        self._portal = Portal()
        self._holder: list[_Endpoint] = []
        self._probed = False
        self._probe_lock: asyncio.Lock | None = None
        # A client dropped without close() still releases its connections, quietly.
        weakref.finalize(self, _release, self._portal, self._holder)
        self._modes: dict[str, StructuredMode] = {}
        self._backoff = wait_exponential_jitter(
            multiplier=0.25, jitter=0.25, max=settings.retry_max_wait_s
        )

    def _state(self) -> _Endpoint:
        # Only ever called on the portal loop, so each endpoint has one client and limiter.
        if not self._holder:
            urls = dict.fromkeys([self.base_url, *self.settings.base_urls])
            self._holder.extend(_Endpoint(self.settings, url) for url in urls)
        return _pick(self._holder)

    async def capacity(self) -> int:
        """Requests the server(s) run at once: probed once (``probe_capacity``), else the
        settings. Sizes the concurrency limit of each endpoint on first use."""
        return await self._portal.arun(self._probe_here())

    async def _probe_here(self) -> int:
        self._state()
        if self._probe_lock is None:
            self._probe_lock = asyncio.Lock()
        async with self._probe_lock:
            if not self._probed:
                self._probed = True
                if self.settings.probe_capacity:
                    for endpoint in self._holder:
                        await self._probe_endpoint(endpoint)
        return sum(e.limit.maximum for e in self._holder)

    async def _probe_endpoint(self, endpoint: _Endpoint) -> None:
        slots = await probe_parallel_capacity(
            endpoint.url, self.settings.api_key.get_secret_value()
        )
        if slots is None:
            return
        if "max_concurrency" in self.settings.model_fields_set:
            slots = min(slots, self.settings.max_concurrency)  # the user's cap still holds
        endpoint.limit.maximum = endpoint.limit.limit = slots
        endpoint.probed_slots = slots

    def _limiter(self) -> AdaptiveLimiter:
        """The concurrency limit of the next request (of the least-loaded endpoint)."""
        return self._state().limit

    @property
    def requests_by_endpoint(self) -> dict[str, int]:
        """Requests in flight per endpoint URL (for load spreading across replicas)."""
        return {e.url: e.limit.in_flight for e in self._holder}

    @property
    def concurrency_limit(self) -> int:
        """Requests currently allowed in flight (lowered after 429/503, then recovering)."""
        if not self._holder:
            return self.settings.max_concurrency * (1 + len(self.settings.base_urls))
        return sum(e.limit.limit for e in self._holder)

    def run_sync(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run a coroutine that uses this client from synchronous code."""
        return self._portal.run(coro)

    def close(self) -> None:
        """Close the connections and stop the background loop. The client can be reused."""
        _release(self._portal, self._holder, wait=True)

    async def aclose(self) -> None:
        """``close()`` for async code."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _redact(self, text: str) -> str:
        key = self.settings.api_key.get_secret_value()
        return text.replace(key, "***") if len(key) >= 4 else text

    async def list_models(self) -> list[str]:
        """The model names the server offers (``GET /models``)."""
        return await self._portal.arun(self._list_models_here())

    async def _list_models_here(self) -> list[str]:
        try:
            page = await self._state().client.models.list()
        except openai.OpenAIError as exc:
            raise self._translate(exc, model="", attempts=1) from exc
        return [model.id async for model in page]

    # -- plain chat ---------------------------------------------------------------------
    async def chat(
        self,
        messages: Sequence[Message],
        *,
        role: Role | str,
        max_tokens: int | None = None,
        response_format: dict[str, Any] | None = None,
        stream: bool = False,
        progress: StreamProgress | None = None,
        budget: CallBudget | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Completion:
        """One chat completion, retried on transient errors.

        ``tools`` (OpenAI tool specs) lets the model ask for tool calls; such calls are not
        streamed, and ``Completion.tool_calls`` lists what it asked for.

        ``budget`` is asked before each request is sent, once a concurrency slot is free, and
        told the tokens of each answer before the slot is released; so a run's budget is
        never overshot by more than the requests already in flight.

        With ``stream=True`` the answer is streamed: cancelling the caller closes the HTTP
        response, so the server stops generating, and ``progress`` tells what was produced.

        Raises:
            AuthenticationError: 401/403, after exactly one request.
            ModelNotFoundError: 404.
            ServerUnreachableError: no connection after the retries.
            ModelCallError: any other failure that retries did not cure.
        """
        model = self.settings.model_for(role)
        started = time.time()
        requests = 0
        retrying = self._retrying(budget)
        try:
            async for attempt in retrying:
                with attempt:
                    requests += 1
                    if progress is not None:
                        progress.requests = requests
                    completion = await self._request(
                        messages,
                        model=model,
                        role=role,
                        max_tokens=max_tokens or self.settings.max_tokens_for(role),
                        response_format=response_format,
                        progress=progress if stream else None,
                        stream=stream and not tools,
                        budget=budget,
                        tools=tools,
                    )
        except Exception as exc:
            raise self._translate(exc, model=model, attempts=requests) from exc
        return replace(completion, requests=requests, started_at=started)

    def _retrying(self, budget: CallBudget | None) -> AsyncRetrying:
        """The one retry policy: transient errors only, Retry-After honoured within limits."""
        return AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_any(
                stop_after_attempt(self.settings.max_retries + 1),
                _StopIfWaitTooLong(self.settings.retry_max_wait_s, budget),
            ),
            wait=self._wait,
            reraise=True,
        )

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = _retry_after_s(exc) if exc is not None else None
        if delay is None:
            delay = self._backoff(state)
        return min(delay, self.settings.retry_max_wait_s)

    async def _request(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        role: Role | str,
        max_tokens: int,
        response_format: dict[str, Any] | None,
        stream: bool = False,
        progress: StreamProgress | None = None,
        budget: CallBudget | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Completion:
        if stream:
            return await self._portal.arun(
                self._stream_here(
                    messages,
                    model=model,
                    role=role,
                    max_tokens=max_tokens,
                    progress=progress or StreamProgress(),
                    budget=budget,
                )
            )
        return await self._portal.arun(
            self._request_here(
                messages,
                model=model,
                role=role,
                max_tokens=max_tokens,
                response_format=response_format,
                budget=budget,
                tools=tools,
            )
        )

    async def complete(
        self,
        prompt: str,
        *,
        role: Role | str,
        stop: Sequence[str],
        max_tokens: int,
        budget: CallBudget | None = None,
        progress: StreamProgress | None = None,
    ) -> Completion:
        """One streamed text completion (``/v1/completions``) that ends at a stop string.

        For models that write their own parallel blocks. ``Completion.stop_reason`` is the
        stop string that ended it, when the server says (vLLM ``stop_reason``, llama.cpp
        ``stopping_word``). Retried like ``chat``; cancelling closes the stream.
        """
        model = self.settings.model_for(role)
        started = time.time()
        requests = 0
        progress = progress or StreamProgress()
        retrying = self._retrying(budget)
        try:
            async for attempt in retrying:
                with attempt:
                    requests += 1
                    completion = await self._portal.arun(
                        self._complete_here(
                            prompt,
                            model=model,
                            role=role,
                            stop=stop,
                            max_tokens=max_tokens,
                            budget=budget,
                            progress=progress,
                        )
                    )
        except Exception as exc:
            raise self._translate(exc, model=model, attempts=requests) from exc
        return replace(completion, requests=requests, started_at=started)

    async def _complete_here(
        self,
        prompt: str,
        *,
        model: str,
        role: Role | str,
        stop: Sequence[str],
        max_tokens: int,
        budget: CallBudget | None,
        progress: StreamProgress,
    ) -> Completion:
        await self._probe_here()
        state = self._state()
        progress.text, progress.completion_tokens = "", 0
        async with state.limit:
            _admit(budget)
            started = progress.started_at = time.time()
            response: Any = await state.send(
                state.client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=self.settings.temperature,
                    stop=list(stop) or None,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers={"X-Apr-Role": role},
                )
            )
            end = await _read_stream(response, progress, _choice_text)
            usage, finish_reason, stop_reason = end.usage, end.finish_reason, end.stop_reason
            completion_tokens = getattr(usage, "completion_tokens", None)
            prompt_tokens = getattr(usage, "prompt_tokens", None)
            if completion_tokens is None or prompt_tokens is None:
                completion_tokens, prompt_tokens = progress.completion_tokens, len(prompt) // 4
            if budget is not None:
                progress.charged = True
                budget.charge(int(prompt_tokens) + int(completion_tokens))
        return Completion(
            text=progress.text,
            finish_reason=finish_reason,
            prompt_tokens=int(prompt_tokens),
            completion_tokens=int(completion_tokens),
            cached_tokens=_cached_tokens_from_usage(usage),
            requests=1,
            started_at=started,
            ended_at=time.time(),
            model=model,
            stop_reason=stop_reason,
        )

    async def _stream_here(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        role: Role | str,
        max_tokens: int,
        progress: StreamProgress,
        budget: CallBudget | None = None,
    ) -> Completion:
        await self._probe_here()
        state = self._state()
        progress.text, progress.completion_tokens = "", 0
        async with state.limit:
            _admit(budget)
            started = progress.started_at = time.time()  # sent only once a slot is free
            response: Any = await state.send(
                state.client.chat.completions.create(  # type: ignore[call-overload]
                    model=model,
                    messages=list(messages),
                    max_tokens=max_tokens,
                    temperature=self.settings.temperature,
                    extra_headers={"X-Apr-Role": role},
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            end = await _read_stream(response, progress, _delta_text)
            usage, finish_reason = end.usage, end.finish_reason
            if budget is not None:
                spent = getattr(usage, "total_tokens", None)
                if spent is None:
                    spent = progress.completion_tokens + _prompt_estimate(messages)
                progress.charged = True  # before charging: the charge may stop the run
                budget.charge(int(spent))
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        completion_tokens = getattr(usage, "completion_tokens", None)
        if prompt_tokens is None or completion_tokens is None:
            prompt_tokens = _prompt_estimate(messages)
            completion_tokens = progress.completion_tokens
        return Completion(
            text=strip_reasoning(progress.text),
            finish_reason=finish_reason,
            prompt_tokens=int(prompt_tokens),
            completion_tokens=int(completion_tokens),
            cached_tokens=_cached_tokens_from_usage(usage),
            requests=1,
            started_at=started,
            ended_at=time.time(),
            model=model,
        )

    async def _request_here(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        role: Role | str,
        max_tokens: int,
        response_format: dict[str, Any] | None,
        budget: CallBudget | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Completion:
        await self._probe_here()
        state = self._state()
        kwargs: dict[str, Any] = {}
        if response_format is not None:
            kwargs["response_format"] = response_format
        if tools:
            kwargs["tools"] = list(tools)
        async with state.limit:
            _admit(budget)
            started = time.time()
            try:
                result: Any = await state.send(
                    state.client.chat.completions.create(
                        model=model,
                        messages=list(messages),  # type: ignore[arg-type]
                        max_tokens=max_tokens,
                        temperature=self.settings.temperature,
                        extra_headers={"X-Apr-Role": role},
                        **kwargs,
                    )
                )
            except ValueError as exc:  # a 200 whose JSON body does not parse
                raise _TransientResponseError(f"malformed response body: {exc}") from exc
            except openai.APIStatusError as exc:
                if response_format is not None and _refuses_format(exc):
                    raise _FormatRefusedError(exc) from exc
                raise
            if budget is not None:
                usage = getattr(result, "usage", None)
                spent = getattr(usage, "total_tokens", None)
                budget.charge(int(spent) if spent is not None else _prompt_estimate(messages))
        if not isinstance(result, openai.types.chat.ChatCompletion):
            snippet = str(result)[:120]
            raise _TransientResponseError(f"the server did not return a completion: {snippet!r}")
        choices = getattr(result, "choices", None)
        if not choices:
            raise _TransientResponseError("the server returned no choices")
        choice = choices[0]
        content = getattr(getattr(choice, "message", None), "content", None) or ""
        text = strip_reasoning(content)
        usage = getattr(result, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        completion_tokens = getattr(usage, "completion_tokens", None)
        if prompt_tokens is None or completion_tokens is None:
            # Some servers omit usage; an estimate (4 chars a token) beats a silent zero.
            prompt_tokens = _prompt_estimate(messages)
            completion_tokens = len(content) // 4
        return Completion(
            text=text,
            finish_reason=getattr(choice, "finish_reason", None),
            prompt_tokens=int(prompt_tokens),
            completion_tokens=int(completion_tokens),
            cached_tokens=_cached_tokens(result),
            requests=1,
            started_at=started,
            ended_at=time.time(),
            model=model,
            tool_calls=_tool_calls(getattr(choice, "message", None)),
        )

    def _translate(self, exc: Exception, *, model: str, attempts: int) -> Exception:
        url = self.base_url
        if isinstance(exc, _FormatRefusedError):
            return _FormatRejectedCallError(
                f"HTTP {exc.cause.status_code} from {url}: the server refused the "
                f"response_format: {self._redact(_server_message(exc.cause))}",
                status_code=exc.cause.status_code,
                attempts=attempts,
                url=url,
            )
        if isinstance(exc, AuthenticationError | ModelCallError):
            return exc
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return AuthenticationError(
                f"the server at {url} refused the API key (HTTP {exc.status_code}); "
                "check --api-key / OPENAI_API_KEY",
                status_code=exc.status_code,
                attempts=attempts,
                url=url,
            )
        if isinstance(exc, openai.NotFoundError):
            return ModelNotFoundError(
                f"HTTP 404 from {url} for model {model!r}: {self._redact(_server_message(exc))}",
                status_code=404,
                attempts=attempts,
                url=url,
            )
        if isinstance(exc, openai.APITimeoutError):
            return ModelCallError(
                f"request to {url} timed out after {self.settings.request_timeout_s:g}s "
                f"({attempts} attempts); raise request_timeout_s if the model is slow",
                attempts=attempts,
                url=url,
            )
        if isinstance(exc, openai.APIConnectionError):
            return ServerUnreachableError(
                f"cannot connect to {url} ({attempts} attempts): is the server running, "
                "and is the URL right (it usually ends in /v1)?",
                attempts=attempts,
                url=url,
            )
        if isinstance(exc, openai.APIStatusError):
            hint = ""
            delay = _retry_after_s(exc)
            if delay is not None and delay > self.settings.retry_max_wait_s:
                hint = f"; the server asked to wait {delay:g}s, beyond retry_max_wait_s"
            elif delay is not None and exc.status_code in _RETRYABLE_STATUS | {503}:
                hint = f"; the server asked to wait {delay:g}s, beyond the run's deadline"
            return ModelCallError(
                f"HTTP {exc.status_code} from {url} after {attempts} attempts: "
                f"{self._redact(_server_message(exc))}{hint}",
                status_code=exc.status_code,
                attempts=attempts,
                url=url,
            )
        if isinstance(exc, _TransientResponseError):
            return ModelCallError(
                f"{exc} (from {url}, {attempts} attempts)", attempts=attempts, url=url
            )
        return exc

    # -- structured output ----------------------------------------------------------------
    async def structured(
        self,
        messages: Sequence[Message],
        output_type: type[T],
        *,
        role: Role | str,
        schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        budget: CallBudget | None = None,
    ) -> tuple[T, Completion]:
        """Ask for JSON matching ``output_type`` and return it validated.

        ``schema`` overrides the JSON schema sent to the server (e.g. with tighter bounds).

        Raises:
            StructuredOutputError: no valid answer after ``max_repairs`` re-asks.
            ModelCallError: the request itself failed.
        """
        schema = schema or output_type.model_json_schema()
        key = f"{self.base_url}|{self.settings.model_for(role)}"
        if self.settings.structured_output != "auto":
            modes: tuple[StructuredMode, ...] = (self.settings.structured_output,)
        elif key in self._modes:
            modes = (self._modes[key],)
        else:
            modes = _MODE_CHAIN
        spent: Completion | None = None
        for mode in modes:
            try:
                value, completion = await self._structured_in_mode(
                    mode,
                    messages,
                    output_type,
                    schema,
                    role=role,
                    max_tokens=max_tokens,
                    budget=budget,
                )
            except _ModeRejectedError as rejected:
                spent = rejected.args[0] if spent is None else spent.plus(rejected.args[0])
                continue
            self._modes[key] = mode
            return value, completion if spent is None else spent.plus(completion)
        raise ModelCallError(
            f"the server at {self.base_url} rejected every structured-output mode "
            f"({', '.join(modes)})",
            status_code=400,
            url=self.base_url,
        )

    async def _structured_in_mode(
        self,
        mode: StructuredMode,
        messages: Sequence[Message],
        output_type: type[T],
        schema: dict[str, Any],
        *,
        role: Role | str,
        max_tokens: int | None,
        budget: CallBudget | None = None,
    ) -> tuple[T, Completion]:
        conversation = [dict(m) for m in messages]
        response_format: dict[str, Any] | None
        if mode == "json_schema":
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": output_type.__name__, "schema": schema},
            }
        elif mode == "json_object":
            response_format = {"type": "json_object", "schema": schema}
        else:
            response_format = None
        if mode != "json_schema":
            # json_object needs the word JSON in the prompt (OpenAI), and prompt mode needs
            # the schema itself; both gain from seeing it.
            conversation[0] = {
                **conversation[0],
                "content": conversation[0]["content"] + schema_instruction(schema),
            }
        errors: list[str] = []
        total: Completion | None = None
        last_text: str | None = None
        for _ in range(self.settings.max_repairs + 1):
            try:
                completion = await self.chat(
                    conversation,
                    role=role,
                    max_tokens=max_tokens,
                    response_format=response_format,
                    budget=budget,
                )
            except _FormatRejectedCallError as exc:
                now = time.time()
                model = self.settings.model_for(role)
                zero = Completion("", None, 0, 0, None, exc.attempts, now, now, model, mode)
                raise _ModeRejectedError(zero if total is None else total.plus(zero)) from exc
            total = completion if total is None else total.plus(completion)
            last_text = completion.text
            error = _validate_error(completion, output_type)
            if isinstance(error, BaseModel):
                return error, replace(total, mode=mode)
            errors.append(error)
            conversation.append({"role": "assistant", "content": completion.text[:4000]})
            conversation.append(repair_message(error))
        raise StructuredOutputError(
            f"the model gave no valid {output_type.__name__} after "
            f"{len(errors)} attempts ({mode} mode); last error: {errors[-1]}",
            last_response=last_text,
            errors=errors,
            attempts=len(errors),
            url=self.base_url,
            prompt_tokens=total.prompt_tokens if total else 0,
            completion_tokens=total.completion_tokens if total else 0,
        )


class _FormatRejectedCallError(ModelCallError):
    """The final form of ``_FormatRefusedError``: the structured caller tries the next mode."""


def _validate_error(completion: Completion, output_type: type[T]) -> T | str:
    """The validated value, or the error message to show the model."""
    if completion.finish_reason == "length":
        return "your JSON was cut off at the output-token limit; reply with a shorter JSON object"
    try:
        data = extract_json(completion.text)
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    try:
        return output_type.model_validate(data)
    except ValidationError as exc:
        return exc.json(include_url=False, include_context=False)[:2000]


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error")
        if isinstance(message, dict):
            message = message.get("message")
        if message:
            return str(message)[:300]
    return str(exc.message)[:300]


def _tool_calls(message: Any) -> tuple[dict[str, str], ...]:
    calls = []
    for call in getattr(message, "tool_calls", None) or []:
        function = getattr(call, "function", None)
        if function is not None:
            calls.append({"id": str(getattr(call, "id", "")), "name": str(function.name),
                          "arguments": str(function.arguments or "{}")})  # fmt: skip
    return tuple(calls)


def _cached_tokens_from_usage(usage: Any) -> int | None:
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
    return None if cached is None else int(cached)


def _cached_tokens(result: Any) -> int | None:
    usage = getattr(result, "usage", None)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None)
    if cached is not None:
        return int(cached)
    timings = (getattr(result, "model_extra", None) or {}).get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        return int(timings["cache_n"])
    return None
