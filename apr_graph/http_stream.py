"""The bulk path of a fan-out: streamed POSTs read as server-sent events, and the SDK's errors.

A fan-out of hundreds of threads makes hundreds of streamed chat requests at once. On aiohttp
(``http_client``: ``auto``/``aiohttp``) they go to an ``aiohttp.ClientSession`` directly, one
per endpoint, the events read from its byte stream and parsed with plain ``json``: no SDK
request pipeline, no httpx API layered over aiohttp, no per-chunk models (BENCHMARKS.md,
"Framework overhead"). What the SDK would do is kept: its headers (auth, user agent,
organization), its timeout, the proxy settings of the environment, and its error classes
(``status_error``, ``transport_error``, ``timed_out``), so ``failures.classify`` and the one
retry policy see exactly what they see from the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import openai

__all__ = ["AiohttpStreams", "status_error", "timed_out", "transport_error"]

_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def status_error(response: Any) -> openai.APIStatusError:
    """The SDK's error for a failed status: the class, message and body its client builds
    (``Error code: 429 - <message>``; ``body`` is the ``error`` object when there is one).
    ``response`` is an httpx response of the SDK's httpx (read)."""
    text = response.text.strip()
    body: Any = text
    message = f"Error code: {response.status_code}"
    with contextlib.suppress(ValueError):
        body = json.loads(text)
    if isinstance(body, dict):
        body = body.get("error", body)
        said = body.get("message") if isinstance(body, dict) else None
        if isinstance(said, str) and said:
            message += f" - {said}"
    elif text:
        message += f" - {text[:300]}"
    kind = _STATUS_ERRORS.get(response.status_code)
    if kind is None:
        kind = openai.InternalServerError if response.status_code >= 500 else openai.APIStatusError
    return kind(message, response=response, body=body)


def transport_error(exc: BaseException, request: Any) -> Exception:
    """The SDK's error for a request that got no response (as its own client maps them):
    a timeout is ``APITimeoutError``, anything else ``APIConnectionError``."""
    if isinstance(exc, openai.APIError):
        return exc
    if timed_out(exc) and not _refused(exc):
        return openai.APITimeoutError(request=request)
    return openai.APIConnectionError(message=f"Connection error: {exc}", request=request)


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a timeout of either stack: httpx's ``TimeoutException`` family
    (matched by name: its module differs between SDK versions, httpx or httpx2) or aiohttp's
    ``ServerTimeoutError`` / ``SocketTimeoutError`` / ``ConnectionTimeoutError`` (all
    ``TimeoutError``)."""
    return isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower()


def _refused(exc: BaseException) -> bool:
    """Whether a socket error (not a timeout) lies under ``exc``: the SDK's aiohttp transport
    reports a refused connection as ``ConnectTimeout``, and "timed out after 120 s" would
    send the user looking in the wrong place."""
    seen: BaseException | None = exc.__cause__ or exc.__context__
    for _ in range(8):  # a chain is short; a cycle must not hang the error path
        if seen is None:
            break
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class AiohttpStreams:
    """Streamed POSTs to one endpoint on an ``aiohttp.ClientSession`` of its own.

    Args:
        sdk_http: the SDK client's HTTP client: it builds the request and response objects
            (of the SDK's httpx) that errors carry.
        timeout_s: the SDK's timeout: for connecting, and for each read of the stream.
        https: whether the endpoint is ``https://`` (then certifi's certificates are trusted,
            as by the SDK).
        keepalive_s: how long an idle connection is kept.
    """

    def __init__(self, sdk_http: Any, *, timeout_s: float, https: bool, keepalive_s: float) -> None:
        import aiohttp

        self._http = sdk_http
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
        )
        self._https = https
        self._proxies: dict[str, str | None] = {}
        self._keepalive_s = keepalive_s
        self._session: Any = None

    def _open(self) -> Any:
        """The session, opened on first use (on the running loop, which it is bound to)."""
        if self._session is None:
            import aiohttp

            tls: ssl.SSLContext | bool = _tls_context() if self._https else False
            # no cap on connections: the endpoint's limiter bounds the requests in flight
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self._keepalive_s, ssl=tls)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def post(self, url: str, payload: bytes, headers: dict[str, str]) -> _SseResponse:
        """Send the request; the unread response of a 2xx status, else the SDK's error."""
        try:
            response = await self._open().post(
                url, data=payload, headers=headers, timeout=self.timeout, proxy=self._proxy(url)
            )
        except Exception as exc:
            raise transport_error(exc, self._request(url)) from exc
        if response.status >= 400:
            try:
                content = await response.read()
            except Exception as exc:
                raise transport_error(exc, self._request(url)) from exc
            finally:
                response.release()
            raise status_error(self._response(url, response, content))
        return _SseResponse(response, self, url)

    def _proxy(self, url: str) -> str | None:
        """The proxy the environment names for ``url`` (``HTTP(S)_PROXY``, ``NO_PROXY``), as
        the SDK's httpx client honours them; looked up once per URL, not per request (as
        aiohttp's ``trust_env`` would, at a cost a fan-out notices)."""
        if url not in self._proxies:
            parts = urlsplit(url)
            bypass = urllib.request.proxy_bypass(parts.hostname or "")
            found = None if bypass else urllib.request.getproxies().get(parts.scheme)
            self._proxies[url] = found
        return self._proxies[url]

    async def aclose(self) -> None:
        """Close the session's connections (a later request opens a new session)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _request(self, url: str) -> Any:
        """The SDK's request object for ``url`` (errors carry one)."""
        return self._http.build_request("POST", url)

    def _response(self, url: str, response: Any, content: bytes) -> Any:
        """An SDK-httpx response with ``response``'s status, headers and body."""
        request = self._request(url)
        httpx = sys.modules[type(request).__module__.partition(".")[0]]
        return httpx.Response(
            response.status,
            headers=list(response.headers.items()),
            content=content,
            request=request,
        )


class _Silence:
    """The read timeout of a streamed body, checked a few times per timeout instead of
    re-armed on every network read.

    aiohttp's ``sock_read`` cancels and schedules a timer for each piece of data that
    arrives, a tenth of what reading a streamed token costs. Once the headers are in, this
    watch takes over: every quarter of the timeout it looks whether the body has grown
    (``StreamReader.total_bytes``), and after a whole timeout without a byte it fails the
    body with aiohttp's own ``SocketTimeoutError`` (raised to the reader, as before). A
    silence is caught between one and one and a quarter timeouts after it began.
    """

    def __init__(self, response: Any, timeout_s: float | None) -> None:
        self._content = response.content
        self._timeout = timeout_s
        self._handle: asyncio.TimerHandle | None = None
        protocol = getattr(response.connection, "protocol", None)
        if not timeout_s or protocol is None:
            return  # no timeout, or the body is already in: aiohttp's own rules stand
        self._loop = asyncio.get_running_loop()
        self._seen = self._content.total_bytes
        self._quiet_since = self._loop.time()
        protocol.read_timeout = None  # its timer is dropped at the next piece of data
        self._handle = self._loop.call_later(timeout_s / 4, self._check)

    def _check(self) -> None:
        assert self._timeout is not None
        now = self._loop.time()
        if self._content.total_bytes != self._seen:
            self._seen, self._quiet_since = self._content.total_bytes, now
        elif now - self._quiet_since >= self._timeout:
            import aiohttp

            self._handle = None
            self._content.set_exception(
                aiohttp.SocketTimeoutError("Timeout on reading data from socket")
            )
            return
        self._handle = self._loop.call_later(self._timeout / 4, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _SseResponse:
    """An aiohttp response read as lines of server-sent events (what ``read_stream`` reads)."""

    def __init__(self, response: Any, streams: AiohttpStreams, url: str) -> None:
        self._response = response
        self._streams = streams
        self._url = url
        self._lines: AsyncGenerator[list[str], None] | None = None

    @property
    def request(self) -> Any:
        return self._streams._request(self._url)

    def aiter_line_batches(self) -> AsyncIterator[list[str]]:
        """The stream's lines, decoded, without their line ends and without the blank lines
        between events: a list for each network read (one await per read, not per line)."""
        lines = self._lines = self._read_batches()
        return lines

    async def _read_batches(self) -> AsyncGenerator[list[str], None]:
        rest = b""
        silence = _Silence(self._response, self._streams.timeout.sock_read)
        try:
            async for chunk in self._response.content.iter_any():
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                yield [line.rstrip(b"\r").decode() for line in lines if line.strip()]
        finally:
            silence.stop()
        if rest.strip():
            yield [rest.rstrip(b"\r").decode()]

    async def aclose(self) -> None:
        """Release the connection: kept alive when the body was read to its end, closed
        otherwise: a cancelled thread's server stops generating."""
        if self._lines is not None:  # one left mid-way: closed here, not by a finalizer task
            await self._lines.aclose()
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


def _tls_context() -> ssl.SSLContext:
    """The certificates the SDK's httpx trusts (certifi's), else the system's."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())
