"""Custom stream events, emitted through ``stream_mode="custom"``.

Every event is a JSON-shaped dict with an ``event`` key:

- ``{"event": "plan", "strategy", "subtasks": [{"id", "goal"}], "notes"}``: the plan is ready.
- ``{"event": "thread_started", "id", "goal", "at"}``: a thread sent its request.
- ``{"event": "thread_finished", "id", "status", "completion_tokens", "elapsed_s", "error",
  "answer"}``: a thread is done (``status`` ``done``) or gave up (``failed``, with ``error``).

Example:
    >>> async for mode, chunk in app.astream(inputs, stream_mode=["custom", "updates"]):
    ...     if mode == "custom" and chunk["event"] == "thread_finished":
    ...         print(chunk["id"], chunk["status"])
"""

from __future__ import annotations

from typing import Any

from langgraph.config import get_stream_writer

__all__ = ["emit"]


def emit(event: str, **fields: Any) -> None:
    """Send one custom event to the stream; a no-op outside a graph run."""
    try:
        writer = get_stream_writer()
    except RuntimeError:  # called outside a runnable context (e.g. a unit test of a node)
        return
    writer({"event": event, **fields})
