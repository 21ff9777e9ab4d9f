"""The client front: the one place the graph asks a model for anything.

``LLMClient`` puts one retry policy (``retry``), one error classification (``failures``) and
structured output (``structured``) around a transport that sends single requests. Every call
runs on its caller's event loop: cancelling the caller closes the HTTP response. Sync code
lends no loop: ``run_sync`` runs a coroutine on the client's one helper loop.
"""

from __future__ import annotations

import asyncio
import copy
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from pydantic import BaseModel

from apr_graph.errors import AprError, ConfigurationError, ServerCapabilityError
from apr_graph.failures import RETRYABLE, FailureKind, classify, to_error
from apr_graph.http_pool import close_in_background
from apr_graph.openai_transport import OpenAITransport
from apr_graph.responses import Completion, Message, StreamProgress, with_loop_saving
from apr_graph.retry import CallBudget, RetryPolicy
from apr_graph.settings import AprSettings, Role
from apr_graph.structured import StructuredOutput
from apr_graph.sync_loop import SyncLoop
from apr_graph.transport import ChatRequest, TextRequest, Transport

__all__ = ["CallBudget", "Completion", "LLMClient", "StreamProgress"]

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")


class LLMClient:
    """A model client with one retry layer and robust structured output.

    One instance serves a whole graph; it may be shared by concurrent runs, threads and event
    loops. ``close()`` it (or use it as a context manager) when done, to release connections.

    Args:
        settings: endpoint, models, limits and retries.
        transport: what sends the requests; by default an ``OpenAITransport`` to
            ``settings.base_url`` (and ``base_urls``).

    Raises:
        ConfigurationError: no transport and no ``base_url``.
    """

    def __init__(self, settings: AprSettings, *, transport: Transport | None = None) -> None:
        if transport is None:
            if settings.base_url is None:
                raise ConfigurationError(
                    "no model server configured: pass AprSettings(base_url=...) or set "
                    "OPENAI_BASE_URL (e.g. http://localhost:8000/v1 for vLLM, "
                    "http://localhost:11434/v1 for Ollama)"
                )
            transport = OpenAITransport(settings)
        self.settings = settings
        self.transport = transport
        self._requests = settings  # what shapes each request: models, allowances, temperature
        self._origin: LLMClient | None = None
        self._sync = SyncLoop()
        self._policy = RetryPolicy(settings)
        self._structured = StructuredOutput(settings, transport.name)
        self._found: dict[str, ServerCapabilityError] = {}
        """What the server was found unable to do (``tools``), for good; shared by views."""
        # a client dropped without close() stops its helper loop (pools close with their loops)
        weakref.finalize(self, self._sync.shutdown, wait=False)

    @property
    def base_url(self) -> str:
        """Where requests go (the first endpoint's URL, or the chat model's name)."""
        return self.transport.name

    @property
    def concurrency_limit(self) -> int:
        """Requests currently allowed in flight (lowered after 429/503, then recovering)."""
        return self.transport.concurrency_limit()

    def for_run(self, settings: AprSettings) -> LLMClient:
        """This client, sending the model names, output allowances and temperature of
        ``settings`` (its other fields are not read); connections, limits, probe, retries and
        structured-output modes stay this client's, shared by every run."""
        if settings is self._requests:
            return self
        view = copy.copy(self)
        view._requests = settings
        view._origin = self._origin or self  # the owner of the connections lives as long
        return view

    # -- lifecycle -------------------------------------------------------------------------
    def run_sync(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run a coroutine that uses this client from sync code, on the client's helper loop.

        Raises:
            RuntimeError: called from that loop itself (await the coroutine instead).
        """
        return self._sync.run(coro)

    def close(self) -> None:
        """Close the connections (on every event loop that has some) and stop the helper
        loop of sync calls. The client can be reused. In async code, ``await aclose()``."""
        self._sync.shutdown(wait=True)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # awaited in a loop of its own
            own = asyncio.new_event_loop()  # not asyncio.run: the thread's current loop stays
            try:
                own.run_until_complete(self.transport.aclose())
            finally:
                own.close()
        else:  # this thread runs a loop, which cannot be blocked: in a task there
            close_in_background(self.transport.aclose())

    async def aclose(self) -> None:
        """``close()`` for async code."""
        if self._sync.started:  # its thread is joined, without blocking this loop
            await asyncio.to_thread(self._sync.shutdown, wait=True)
        await self.transport.aclose()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- calls ---------------------------------------------------------------------------
    async def capacity(self) -> int:
        """Requests the server(s) run at once: probed once, else the settings."""
        return await self.transport.capacity()

    async def capacity_report(self) -> dict[str, Any]:
        """What probing found: ``width`` (``None``: unknown), ``source``, ``limit`` (requests
        sent at once), and ``slot_context`` / ``kv_cache_tokens`` when the server says."""
        await self.capacity()
        return self.transport.capacity_report()

    async def list_models(self) -> list[str]:
        """The model names the server offers (``GET /models``)."""
        try:
            return await self.transport.list_models()
        except AprError:
            raise  # already says what happened; never its own cause
        except Exception as exc:
            raise self._error(exc, classify(exc), model="", attempts=1) from exc

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        role: Role | str,
        max_tokens: int | None = None,
        response_format: dict[str, Any] | None = None,
        stream: bool = True,
        progress: StreamProgress | None = None,
        budget: CallBudget | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        temperature: float | None = None,
        thread: str | None = None,
    ) -> Completion:
        """One chat completion, retried on transient errors (``temperature``: this call's,
        instead of the settings'; ``thread``: the thread it is for, told to callbacks).

        Answers are streamed unless ``stream=False``: a server is given up only after
        ``request_timeout_s`` without any data. ``tools`` (OpenAI tool specs) lets the model
        ask for tool calls (``Completion.tool_calls``); a server found unable to serve tools
        is not asked again (the same ``ServerCapabilityError`` is raised at once).

        ``budget`` is asked before each request is sent, once a concurrency slot is free, and
        charged before the slot is released: it is never overshot by more than the requests
        in flight. Cancelling closes the HTTP response; ``progress`` tells what was produced.

        Raises:
            AuthenticationError: the key was refused, after exactly one request.
            ModelNotFoundError: the server refused the model name (404, or a 400 that says so).
            ContextOverflowError: the request does not fit the model's context.
            ServerCapabilityError: the server cannot do what the request needs.
            ServerUnreachableError: no connection after the retries.
            ModelCallError: any other failure that retries did not cure.
        """
        run = self._requests
        request = ChatRequest(
            messages=messages,
            model=run.model_for(role),
            role=role,
            max_tokens=max_tokens or run.max_tokens_for(role),
            temperature=run.temperature if temperature is None else temperature,
            stream=stream,
            response_format=response_format,
            tools=tools,
            thread=thread,
        )
        if tools and (known := self._found.get("tools")) is not None:
            raise ServerCapabilityError(
                str(known), status_code=known.status_code, attempts=0, url=known.url
            )
        return await self._attempts(request, progress, budget)

    def start(self, call: Coroutine[Any, Any, R]) -> asyncio.Future[R]:
        """Start one of this client's calls (``chat(...)``, ...) now, as a task on the caller's
        loop; a future of its outcome (cancelling it cancels the call)."""
        return asyncio.ensure_future(call)

    async def complete(
        self,
        prompt: str,
        *,
        role: Role | str,
        stop: Sequence[str],
        max_tokens: int,
        budget: CallBudget | None = None,
        progress: StreamProgress | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> Completion:
        """One streamed text completion (``/v1/completions``) that ends at a stop string.

        ``Completion.stop_reason`` is the stop string that ended it, when the server says.
        ``extra_body`` adds server-specific fields (e.g. ``skip_special_tokens``). Retried
        like ``chat``; cancelling closes the stream.
        """
        request = TextRequest(
            prompt=prompt,
            model=self._requests.model_for(role),
            role=role,
            max_tokens=max_tokens,
            temperature=self._requests.temperature,
            stop=tuple(stop),
            extra_body=dict(extra_body or {}),
        )
        return await self._attempts(request, progress, budget)

    async def structured(
        self,
        messages: Sequence[Message],
        output_type: type[T],
        *,
        role: Role | str,
        schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        budget: CallBudget | None = None,
        progress: StreamProgress | None = None,
    ) -> tuple[T, Completion]:
        """Ask for JSON matching ``output_type`` and return it validated (see ``structured``).

        ``schema`` overrides the JSON schema sent to the server (e.g. with tighter bounds).
        ``progress`` sees the reply stream in (each re-ask starts it afresh).

        Raises:
            StructuredOutputError: no valid answer after ``max_repairs`` re-asks.
            ModelCallError: the request itself failed.
        """
        return await self._structured(
            self.chat,
            messages,
            output_type,
            role=role,
            model=self._requests.model_for(role),
            schema=schema,
            max_tokens=max_tokens,
            budget=budget,
            progress=progress,
        )

    async def _attempts(
        self,
        request: ChatRequest | TextRequest,
        progress: StreamProgress | None,
        budget: CallBudget | None,
    ) -> Completion:
        """The one retry loop around single requests (the transport's ``chat`` or ``complete``)."""
        send_one: Callable[..., Awaitable[Completion]] = self.transport.complete
        has_format = has_tools = False
        if isinstance(request, ChatRequest):
            send_one = self.transport.chat
            has_format, has_tools = request.response_format is not None, bool(request.tools)
        started = time.time()
        progress = progress or StreamProgress()
        # A reply a server constrains to a JSON schema is bounded by it (lengths, item
        # counts), and JSON cut mid-way is of no use: such replies run to their end.
        progress.detect_loops = self._requests.stop_loops and not has_format
        send = partial(send_one, request, progress=progress, budget=budget)
        kind_of = partial(classify, has_format=has_format, has_tools=has_tools)
        progress.requests = 1
        try:
            try:
                completion = await send()
            except Exception as exc:
                if kind_of(exc) not in RETRYABLE:
                    raise
                # Most calls succeed at once: the retry loop (a dozen objects per call, held
                # for the whole stream) is built only for a call that needs it.
                completion = await self._retried(send, exc, progress, budget, kind_of)
        except AprError:
            raise  # already says what happened (budget ran out, a chat model refused)
        except Exception as exc:
            kind = kind_of(exc)
            error = self._error(exc, kind, model=request.model, attempts=progress.requests)
            if isinstance(error, ServerCapabilityError) and kind == "tools":
                self._found["tools"] = error  # a fixed configuration: found once, for good
            raise error from exc
        completion = replace(completion, requests=progress.requests, started_at=started)
        return with_loop_saving(completion, request.max_tokens)

    async def _retried(
        self,
        send: Callable[[], Awaitable[Completion]],
        first: Exception,
        progress: StreamProgress,
        budget: CallBudget | None,
        kind_of: Callable[[BaseException], FailureKind],
    ) -> Completion:
        """The retries of a call whose first request failed with ``first`` (retryable): the
        retry loop judges it as its own first attempt (its ``Retry-After`` is honoured)."""
        failed = [first]

        async def attempt() -> Completion:
            if failed:  # the first failure, replayed for the loop to judge
                raise failed.pop()
            progress.requests += 1
            return await send()

        async for retry in self._policy.retrying(lambda exc: kind_of(exc) in RETRYABLE, budget):
            with retry:
                completion = await attempt()
        return completion

    def _error(self, exc: Exception, kind: FailureKind, *, model: str, attempts: int) -> AprError:
        key = self.settings.api_key.get_secret_value()
        return to_error(
            exc,
            kind,
            url=self.base_url,
            model=model,
            attempts=attempts,
            timeout_s=self.settings.request_timeout_s,
            retry_max_wait_s=self.settings.retry_max_wait_s,
            redact=lambda text: text.replace(key, "***") if len(key) >= 4 else text,
        )
