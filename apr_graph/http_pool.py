"""HTTP on aiohttp, the one stack: a session per event loop, requests, SSE bodies.

Every request of an ``OpenAITransport`` and the capacity probe go through an ``HttpPool``;
failures are the SDK's error classes (``sdk_compat``). Connections belong to an event loop, and
callers bring many: a pool keeps one ``aiohttp.ClientSession`` per loop, made there on first
use and closed when that loop shuts down (its ``shutdown_asyncgens``), when the pool is
dropped, or by ``aclose()``.

Requests run in a task with an empty context (``isolated``): what a request leaves on its loop
(a pooled connection's reader, the keep-alive timer) keeps the context it was made in, and a
caller's context holds its LangGraph run, which that would keep alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import ssl
import threading
import urllib.request
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import certifi

from apr_graph.sdk_compat import authorization, sdk_request, status_error, transport_error

__all__ = ["HttpPool", "SseResponse", "close_in_background", "get_once", "isolated"]

T = TypeVar("T")


async def isolated(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the running loop in a task with an empty context (see the module's
    docstring). Cancelling the caller cancels it, and the caller resumes once it has ended
    (its HTTP response closed)."""
    return await asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


_Kept = tuple[Any, AsyncGenerator[None, None]]
"""A loop's session, and what keeps it open until that loop shuts down."""


async def _keep(session: Any) -> AsyncGenerator[None, None]:
    """Holds a loop's session open until the loop's ``shutdown_asyncgens`` (or its finalizer
    hook, when dropped) closes it."""
    try:
        yield
    finally:
        await session.close()  # returns at once if it was closed (``_shut``)


async def _shut(kept: _Kept) -> None:
    """Close a session, then its keeper (the loop's shutdown may be closing the keeper at the
    same time; closing a closed session does nothing)."""
    session, keeper = kept
    await session.close()
    with contextlib.suppress(RuntimeError):  # the loop's shutdown is closing it already
        await keeper.aclose()


_closing: set[asyncio.Task[None]] = set()
"""Closings running on their own loops (held: a loop keeps only weak references to tasks)."""


def close_in_background(closing: Coroutine[Any, Any, None]) -> None:
    """Run ``closing`` as a task of the running loop that nobody awaits, kept alive to its
    end (a connection pool's or a transport's close, from code that cannot wait for it)."""
    task = asyncio.get_running_loop().create_task(closing)
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _shut_here(kept: _Kept) -> None:
    close_in_background(_shut(kept))


class HttpPool:
    """aiohttp sessions of one client, one per event loop, and the requests sent on them.

    Args:
        timeout_s: for connecting, and for each read of a body.
        https: whether an endpoint is ``https://`` (then certifi's certificates are trusted,
            as by the SDK; plain HTTP builds no TLS context).
        keepalive_s: how long an idle connection is kept.
    """

    def __init__(self, *, timeout_s: float, https: bool, keepalive_s: float) -> None:
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
        )
        self._tls = ssl.create_default_context(cafile=certifi.where()) if https else None
        self._keepalive_s = keepalive_s
        self._proxies: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._sessions: dict[weakref.ref[asyncio.AbstractEventLoop], _Kept] = {}
        # Held by the finalizer too, not only by the pool: a pool dropped in a reference cycle
        # must not take its sessions with it (they would be finalized unclosed).
        weakref.finalize(self, _close_all, self._sessions)

    async def session(self) -> Any:
        """The running loop's session (opened on first use there)."""
        loop = asyncio.get_running_loop()
        found = self._sessions.get(weakref.ref(loop))
        if found is not None:
            return found[0]
        # no cap on connections: the endpoints' limiters bound the requests in flight
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=self._keepalive_s, ssl=self._tls or False
        )
        session = aiohttp.ClientSession(connector=connector)
        keeper = _keep(session)
        await keeper.asend(None)  # registers it with this loop: its shutdown closes it
        sessions = self._sessions
        with self._lock:  # the entry goes with its loop (closed by then: see the docstring)
            sessions[weakref.ref(loop, lambda key: sessions.pop(key, None))] = (session, keeper)
        return session

    async def _send(self, method: str, url: str, *, whole: bool, **sent: Any) -> Any:
        """Send a request (``sent``: aiohttp's ``data``, ``headers``, ``timeout``); for a 2xx
        status its body (``whole``) or its unread response, else the SDK's error."""
        session = await self.session()
        try:
            response = await session.request(method, url, proxy=self._proxy(url), **sent)
            if response.status < 400 and not whole:
                return response
            try:
                content = await response.read()
            finally:
                response.release()
        except Exception as exc:
            raise transport_error(exc, method, url) from exc
        if response.status >= 400:
            raise status_error(response.status, response.headers, content, method, url)
        return content

    async def stream(self, url: str, payload: bytes, headers: dict[str, str]) -> SseResponse:
        """POST ``payload``; the unread response of a 2xx status, else the SDK's error."""
        response = await self._send(
            "POST", url, whole=False, data=payload, headers=headers, timeout=self.timeout
        )
        return SseResponse(response, self.timeout.sock_read, url)

    async def fetch(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        payload: bytes | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """One request read whole: the body of a 2xx status parsed as JSON (its text when it
        is not JSON), else the SDK's error (``timeout_s``: a bound on the whole request
        instead of the pool's timeouts)."""
        timeout = self.timeout if timeout_s is None else aiohttp.ClientTimeout(total=timeout_s)
        content = await self._send(
            method, url, whole=True, data=payload, headers=headers, timeout=timeout
        )
        try:
            return json.loads(content)
        except ValueError:
            return content.decode(errors="replace")

    def _proxy(self, url: str) -> str | None:
        """The proxy the environment names for ``url`` (``HTTP(S)_PROXY``, ``NO_PROXY``), as
        the SDK's client honours them; looked up once per URL, not per request (as aiohttp's
        ``trust_env`` would, at a cost a fan-out notices)."""
        if url not in self._proxies:
            parts = urlsplit(url)
            bypass = urllib.request.proxy_bypass(parts.hostname or "")
            self._proxies[url] = None if bypass else urllib.request.getproxies().get(parts.scheme)
        return self._proxies[url]

    async def aclose(self) -> None:
        """Close the sessions: the running loop's now, other loops' on their own loops (a
        closed loop's was closed by its shutdown). A later request opens a new one."""
        here = _close_all(self._sessions, keep_here=True)
        if here is not None:
            await _shut(here)


async def get_once(urls: Sequence[str], api_key: str | None, timeout_s: float = 3.0) -> list[Any]:
    """GET ``urls`` at once within ``timeout_s``, on connections closed after: each parsed
    body (``HttpPool.fetch``), or the exception its request raised (a failed status too)."""
    headers = authorization(api_key)
    pool = HttpPool(
        timeout_s=timeout_s, https=any(u.startswith("https://") for u in urls), keepalive_s=1
    )
    try:
        return await asyncio.gather(
            *(pool.fetch("GET", url, headers, timeout_s=timeout_s) for url in urls),
            return_exceptions=True,
        )
    finally:
        await pool.aclose()


def _close_all(
    sessions: dict[weakref.ref[asyncio.AbstractEventLoop], _Kept], *, keep_here: bool = False
) -> _Kept | None:
    """Close the sessions on their own loops (a closed loop's was closed by its shutdown);
    with ``keep_here``, the running loop's is returned for the caller to await."""
    own = None
    while sessions:
        try:
            key, kept = sessions.popitem()
        except KeyError:  # emptied meanwhile
            break
        loop = key()
        if loop is None or loop.is_closed():
            continue
        if keep_here and loop.is_running() and loop is asyncio.get_running_loop():
            own = kept
            continue
        with contextlib.suppress(RuntimeError):  # it closed meanwhile
            loop.call_soon_threadsafe(_shut_here, kept)
    return own


class _Silence:
    """The read timeout of a streamed body, checked every quarter timeout instead of re-armed
    on every network read (aiohttp's ``sock_read`` timer costs a tenth of a streamed token).

    After a whole timeout without a byte, it fails the body with aiohttp's own
    ``SocketTimeoutError`` (a silence is caught within 1 to 1.25 timeouts).
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


class SseResponse:
    """An aiohttp response read as lines of server-sent events (what ``read_stream`` reads)."""

    def __init__(self, response: Any, timeout_s: float | None, url: str) -> None:
        self._response = response
        self._timeout_s = timeout_s
        self._url = url
        self._lines: AsyncGenerator[list[str], None] | None = None
        self.cut = False
        """Closed before its end (the server may still be generating until it notices)."""

    @property
    def request(self) -> Any:
        """The SDK's request object (errors carry one)."""
        return sdk_request("POST", self._url)

    def aiter_line_batches(self) -> AsyncIterator[list[str]]:
        """The stream's lines, decoded, without their line ends and without the blank lines
        between events: a list for each network read (one await per read, not per line)."""
        lines = self._lines = self._read_batches()
        return lines

    async def _read_batches(self) -> AsyncGenerator[list[str], None]:
        rest = b""
        silence = _Silence(self._response, self._timeout_s)
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
            self.cut = True
            self._response.close()
