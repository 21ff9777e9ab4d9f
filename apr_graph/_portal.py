"""One background event loop that owns a client's HTTP connections.

Every request of a client runs on its portal loop, whatever loop (or thread) the caller is
on: a single connection pool and one concurrency limit serve sync and async callers alike,
and callers' short-lived loops (``asyncio.run``, per-test loops) never strand connections.
Cancelling the caller cancels the request on the portal loop (closing its HTTP response).
Both directions tolerate the other loop having closed meanwhile (Ctrl-C, shutdown).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Portal"]

T = TypeVar("T")

_ISOLATED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "apr_graph_isolated", default=False
)
"""Set in the context of a task the portal started with no caller context of its own."""


def _hand(done: asyncio.Task[T], waiter: asyncio.Future[T] | concurrent.futures.Future[T]) -> None:
    """Give a portal task's outcome to its caller's future (unless the caller gave up)."""
    if waiter.done():
        return
    if done.cancelled():
        waiter.cancel()
    elif (error := done.exception()) is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(done.result())


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


async def _finish(final: Coroutine[Any, Any, Any] | None) -> None:
    loop = asyncio.get_running_loop()
    try:
        pending = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if final is not None:
            await final
    finally:
        loop.stop()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    with contextlib.suppress(RuntimeError):  # that loop has closed: nothing left to do
        loop.call_soon_threadsafe(callback)


class Portal:
    """A lazily started event loop in a daemon thread."""

    def __init__(self, *, caller_context: bool = False) -> None:
        """``caller_context``: run each coroutine in a copy of its caller's context (what a
        LangChain chat model needs to nest its runs under the graph's); by default it runs in
        an empty one. Whatever a task on this loop makes (a connection's reader, a timeout's
        timer) keeps the context it was made in for as long as it lives: a run's context
        holds the run's LangGraph config, and through it the whole graph, its state and this
        portal's client, so pooled connections would keep finished runs alive."""
        self._caller_context = caller_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                # Made in an empty context: the loop's own reader (its self-pipe) keeps the
                # context it was made in for the loop's life, and the loop's thread lives as
                # long as the client, so a loop first started inside a run kept that run's
                # graph, and the client itself, from ever being collected.
                loop = contextvars.Context().run(asyncio.new_event_loop)
                thread = threading.Thread(
                    target=_serve, args=(loop,), name="apr-graph", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _task_context(self) -> contextvars.Context | None:
        """The context of a task started now (``None``: a copy of the current one)."""
        if self._caller_context:
            return None
        fresh = contextvars.Context()
        fresh.run(_ISOLATED.set, True)
        return fresh

    def is_current(self) -> bool:
        """Whether the caller runs on the portal loop itself."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _submit(
        self, coro: Coroutine[Any, Any, T]
    ) -> tuple[concurrent.futures.Future[T], Callable[[], None]]:
        """Start ``coro`` on the portal loop; returns its future and a thread-safe cancel."""
        loop = self._ensure_loop()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            if future.cancelled():
                coro.close()
                return
            task = loop.create_task(coro)  # a sync caller's whole node: it needs its context
            tasks.append(task)

            task.add_done_callback(lambda done: _hand(done, future))

        def cancel() -> None:
            future.cancel()
            _call_soon(loop, lambda: [t.cancel() for t in tasks])

        # The caller's context (LangGraph config, stream writer) is copied into the callback
        # and from there into the task.
        loop.call_soon_threadsafe(start)
        return future, cancel

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal loop and block until its result (sync callers)."""
        if self.is_current():
            coro.close()
            raise RuntimeError("Portal.run() called from the portal loop itself; await instead")
        future, cancel = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            cancel()
            raise

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Start ``coro`` on the portal loop; returns a future of its outcome on the caller's
        loop. Cancelling that future (or a task awaiting it) cancels ``coro`` on the portal
        loop, so a streamed request's response is closed."""
        if self.is_current():
            return asyncio.get_running_loop().create_task(coro, context=self._task_context())
        caller = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = caller.create_future()
        loop = self._ensure_loop()
        # No concurrent Future (a Condition and an RLock per request, held for the whole
        # stream) and no task on the caller's loop: the portal task hands its outcome
        # straight to the caller's future.
        started: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro, context=self._task_context())
            started.append(task)
            task.add_done_callback(finished)

        def finished(done: asyncio.Task[T]) -> None:
            if not done.cancelled():
                done.exception()  # retrieved here, even if the caller's loop has closed
            _call_soon(caller, lambda: _hand(done, waiter))

        def given_up(_: asyncio.Future[T]) -> None:
            # ``start`` ran first on the portal loop: both were queued there from this
            # thread, in this order.
            if waiter.cancelled():
                _call_soon(loop, lambda: [t.cancel() for t in started])

        waiter.add_done_callback(given_up)
        loop.call_soon_threadsafe(start)
        return waiter

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal loop and await it from any other loop."""
        if self.is_current() and (self._caller_context or _ISOLATED.get()):
            return await coro  # already where it belongs: no task of its own
        return await self.start(coro)

    def shutdown(self, final: Coroutine[Any, Any, Any] | None = None, *, wait: bool) -> None:
        """Cancel what runs, run ``final`` (cleanup), then stop the loop. Safe from any
        thread, and from a garbage-collector finalizer (with ``wait=False``)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or loop.is_closed():
            if final is not None:
                final.close()
            return
        _call_soon(loop, lambda: loop.create_task(_finish(final)))
        if wait and thread is not threading.current_thread():
            thread.join(timeout=10)
