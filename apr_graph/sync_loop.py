"""The helper loop of sync callers: one event loop in a daemon thread per client.

Sync code has no loop to lend, and a loop per node would open a connection pool per node: each
node runs whole on this one loop (one hop between threads per node, not per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["SyncLoop"]

R = TypeVar("R")


class SyncLoop:
    """An event loop in a daemon thread, started on first use; its connection pools live as
    long as it does (until ``shutdown``)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run ``coro`` (in the caller's context) on the loop; block until its outcome."""
        with self._lock:
            if self._loop is None:
                # Made in an empty context: the loop's own reader (its self-pipe) keeps the
                # context it was made in for the loop's life; a run's would pin that run.
                self._loop = contextvars.Context().run(asyncio.new_event_loop)
                self._thread = threading.Thread(
                    target=_serve, args=(self._loop,), name="apr-graph", daemon=True
                )
                self._thread.start()
            loop, thread = self._loop, self._thread
        if thread is threading.current_thread():
            coro.close()
            raise RuntimeError("run_sync() called from the client's own loop; await instead")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    @property
    def started(self) -> bool:
        """Whether the loop runs (a sync call started it, and no shutdown stopped it)."""
        return self._loop is not None

    def shutdown(self, *, wait: bool) -> None:
        """Cancel what runs there, close its pools (``shutdown_asyncgens``) and stop it. Safe
        from any thread, and from a finalizer (``wait=False``)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # closed already
            loop.call_soon_threadsafe(lambda: loop.create_task(_finish()))
        if wait and thread is not threading.current_thread():
            thread.join(timeout=10)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


async def _finish() -> None:
    loop = asyncio.get_running_loop()
    try:
        pending = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await loop.shutdown_asyncgens()  # closes the connection pools made on this loop
    finally:
        loop.stop()
