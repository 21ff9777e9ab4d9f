"""Custom stream events, emitted through ``stream_mode="custom"``.

Every event is a JSON-shaped dict with an ``event`` key:

- ``{"event": "notice", "text"}``: a one-line message for the user (e.g. the server does
  not report its capacity, or is being measured before a first fork: ``probe_speed``).
- ``{"event": "plan", "strategy", "subtasks": [{"id", "goal"}], "notes", "merge", "depth",
  "decision"}``: the plan is ready. ``merge``: how results are combined (``None`` for a
  direct answer); ``depth``: 0 for the run's own plan, one more per nested fork;
  ``decision``: why the run answers directly or forks (``None`` for a native run). A plan
  edited at review (``AprSettings.review_plan``), or one replaced because the server refused
  the whole context (``plan["pieces"]``), is sent again, as it will run.
- ``{"event": "thread_started", "id", "goal", "at", "depth"}``: a thread sent its request
  (``depth``: 1 for a thread of the top-level plan). ``"early": true``: sent while the plan
  was written, maybe before the ``plan`` event (``AprSettings.stream_plan``);
  ``"documents": [names]``: given only those documents (``AprSettings.thread_documents``).
  Each is closed by one ``thread_finished``, or by a ``thread_cancelled`` alone for an early
  thread the final plan has no place for.
- ``{"event": "token", "id", "text"}``: a piece of a thread's answer as it streams in (only
  with ``AprSettings(stream_tokens=True)``).
- ``{"event": "tool_call", "id", "tool", "ok"}``: thread ``id`` (``"direct"``: a direct
  answer) called ``tool``; ``ok`` is false when the call was refused or failed (the error
  went back to the model).
- ``{"event": "thread_retry", "id", "attempt", "reason"}``: a rejected result is re-attempted,
  or a reply cut off by its token limit is continued from where it stopped (``reason`` says
  which; a continuation's tokens follow the ones already streamed).
- ``{"event": "thread_looped", "id", "attempt", "at_tokens", "streamed_tokens",
  "saved_tokens", "copied_lines"}``: the reply began repeating itself, or copying its input
  (``copied_lines``, else 0), and was closed: ``at_tokens`` kept, ``streamed_tokens``
  streamed, ``saved_tokens`` of its allowance not generated. A ``thread_retry`` follows if it
  gets one more attempt, else its ``thread_finished`` (``status`` ``done``, with ``looped``).
- ``{"event": "thread_finished", "id", "status", "completion_tokens", "elapsed_s", "error",
  "answer", "depth"}``: a thread is ``done``, ``failed``, ``cancelled``, ``skipped`` or
  ``truncated``.
- ``{"event": "thread_cancelled", "id", "reason", "completion_tokens", "depth"}``: a running
  thread was stopped (a vote or race was settled, or a budget ran out; its
  ``thread_finished`` follows), or a thread started early was dropped by the final plan
  (no record follows; only this one carries ``depth``).
- ``{"event": "answer_token", "text"}``: a piece of the final answer as the merge or direct
  call writes it (answers that need no call, and a direct answer that may call tools,
  arrive whole in the output).
- ``{"event": "answer_retry", "reason", "at_tokens"}``: the direct answer began repeating
  itself ``at_tokens`` in and is asked for once more (``AprSettings.retry_loops``): the
  ``answer_token`` text streamed so far is dropped; the new answer's follows.
- ``{"event": "merge_incomplete", "lost"}``: the merge call left out the results of the
  threads listed in ``lost`` (their ids); those results were added back under the answer.

Example:
    >>> async for mode, chunk in app.astream(inputs, stream_mode=["custom", "updates"]):
    ...     if mode == "custom" and chunk["event"] == "thread_finished":
    ...         print(chunk["id"], chunk["status"])
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from langgraph.config import get_stream_writer

if TYPE_CHECKING:
    from apr_graph.state import PlanRecord

__all__ = ["answer_emitter", "emit", "emit_plan", "token_emitter"]


def emit(event: str, **fields: Any) -> None:
    """Send one custom event to the stream; a no-op outside a graph run."""
    try:
        writer = get_stream_writer()
    except RuntimeError:  # called outside a runnable context (e.g. a unit test of a node)
        return
    writer({"event": event, **fields})


def emit_plan(plan: PlanRecord, depth: int) -> None:
    """Send the ``plan`` event of ``plan``, made at ``depth``."""
    emit(
        "plan",
        strategy=plan["strategy"],
        subtasks=plan["subtasks"],
        notes=plan["notes"],
        merge=plan["merge"],
        depth=depth,
        decision=plan.get("decision"),
    )


def token_emitter(thread_id: str) -> Callable[[str], None] | None:
    """A callback that streams one thread's text as ``token`` events."""
    return _emitter({"event": "token", "id": thread_id})


def answer_emitter() -> Callable[[str], None] | None:
    """A callback that streams the final answer as ``answer_token`` events."""
    return _emitter({"event": "answer_token"})


def _emitter(fields: dict[str, Any]) -> Callable[[str], None] | None:
    try:
        writer = get_stream_writer()
    except RuntimeError:
        return None
    # The writer reads the run's LangGraph config from the context it runs in, and the
    # request that calls ``on_text`` runs in an empty one (``http_pool.isolated``: pooled
    # connections must not keep a finished run alive).
    context = contextvars.copy_context()

    def on_text(text: str) -> None:
        context.run(writer, {**fields, "text": text})

    return on_text
