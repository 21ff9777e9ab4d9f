"""One background event loop that owns a client's HTTP connections.

Every request of a client runs on its portal loop, whatever loop (or thread) the caller is
on: a single connection pool and one concurrency limit serve sync and async callers alike,
and callers' short-lived loops (``asyncio.run``, per-test loops) never strand connections.
Cancelling the caller cancels the request on the portal loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Portal"]

T = TypeVar("T")


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


async def _finish(final: Coroutine[Any, Any, Any] | None) -> None:
    try:
        if final is not None:
            await final
    finally:
        asyncio.get_running_loop().stop()


class Portal:
    """A lazily started event loop in a daemon thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_serve, args=(loop,), name="apr-graph", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def is_current(self) -> bool:
        """Whether the caller runs on the portal loop itself."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal loop and block until its result (sync callers)."""
        if self.is_current():
            coro.close()
            raise RuntimeError("Portal.run() called from the portal loop itself; await instead")
        future = asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal loop and await it from any other loop."""
        if self.is_current():
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())
        return await asyncio.wrap_future(future)

    def shutdown(self, final: Coroutine[Any, Any, Any] | None = None, *, wait: bool) -> None:
        """Run ``final`` (cleanup) on the loop, then stop it. Safe from any thread, and
        from a garbage-collector finalizer (with ``wait=False``)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or loop.is_closed():
            if final is not None:
                final.close()
            return
        loop.call_soon_threadsafe(lambda: loop.create_task(_finish(final)))
        if wait and thread is not threading.current_thread():
            thread.join(timeout=10)
