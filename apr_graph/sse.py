"""Reading a streamed reply: server-sent events of OpenAI chunks, folded into a
``StreamProgress`` as they arrive, and how the stream ended."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import openai

from apr_graph.responses import LOOPED, StreamProgress, TransientResponseError, field_of
from apr_graph.sdk_compat import timed_out

__all__ = ["StreamEnd", "choice_text", "delta_text", "read_stream"]


@dataclass
class StreamEnd:
    """How a stream ended: its finish and stop reasons, the usage it reported, and the tool
    calls its deltas assembled."""

    finish_reason: str | None = None
    stop_reason: str | None = None
    usage: Any = None
    timings: Any = None
    """llama.cpp's ``timings`` (``cache_n``: prompt tokens served from its cache)."""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    """Tool calls by their stream ``index``, as assembled so far."""

    @property
    def tool_calls(self) -> tuple[dict[str, str], ...]:
        """The assembled tool calls as ``{"id", "name", "arguments"}``, in index order."""
        return tuple(
            {**call, "arguments": call["arguments"] or "{}"}
            for _, call in sorted(self.calls.items())
            if call["name"]
        )

    def add_call_deltas(self, deltas: Any) -> int:
        """Fold one chunk's ``delta.tool_calls`` in; returns how many pieces it carried.

        A call's pieces share an ``index`` (OpenAI, vLLM, llama.cpp): the first carries its
        ``id`` and ``name``, the rest slices of ``function.arguments``, which are joined.
        Servers that repeat the id or the whole name in every piece are tolerated; a piece
        without an index belongs to the call at its position in the list.
        """
        if not isinstance(deltas, list):
            return 0
        taken = 0
        for position, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                continue
            index = delta.get("index")
            call = self.calls.setdefault(
                index if isinstance(index, int) else position,
                {"id": "", "name": "", "arguments": ""},
            )
            function = delta.get("function")
            function = function if isinstance(function, dict) else {}
            if isinstance(delta.get("id"), str) and delta["id"] and not call["id"]:
                call["id"] = delta["id"]
            name = function.get("name")
            if isinstance(name, str) and name != call["name"]:
                call["name"] += name
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call["arguments"] += arguments
            elif isinstance(arguments, dict):  # a server that sends them parsed, once
                call["arguments"] = json.dumps(arguments)
            taken += 1
        return taken


async def read_stream(
    response: Any, progress: StreamProgress, piece_of: Callable[[Any], str | None]
) -> StreamEnd:
    """Read a raw server-sent-event response (OpenAI chunks, parsed as plain JSON) into
    ``progress``. Leaving, normally or by cancellation, closes the HTTP response, so the
    server stops generating. An ``error`` event raises the SDK's ``APIError``; silence past
    the read timeout raises its ``APITimeoutError``."""
    end = StreamEnd()
    try:
        lines: AsyncIterator[list[str]] = response.aiter_line_batches()
        async for batch in lines:
            if _take_lines(batch, end, progress, piece_of, response):
                # Read on after [DONE], as the SDK does, so the connection can be reused; a
                # server that keeps the body open costs ``_DRAIN_S``, not the answer.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_DRAIN_S):
                        async for _ in lines:
                            pass
                break
            if progress.loop is not None:  # closing the response stops the server too
                end.finish_reason = LOOPED
                progress.cut_at_loop()
                break
    except (openai.APIError, asyncio.CancelledError):
        raise
    except Exception as exc:
        if timed_out(exc):
            raise openai.APITimeoutError(request=response.request) from exc
        # The transport broke mid-stream, or a chunk was not JSON: worth a retry.
        raise TransientResponseError(
            f"the stream broke after {progress.completion_tokens} tokens: {type(exc).__name__}"
        ) from exc
    finally:
        await response.aclose()
    if end.finish_reason is None:
        raise TransientResponseError(
            f"the stream ended without a finish_reason after {progress.completion_tokens} "
            "tokens (cut off)"
        )
    return end


_DRAIN_S = 0.1
"""How long the rest of a body is read after ``[DONE]`` (the SDK's own bound)."""


def _take_lines(
    batch: list[str],
    end: StreamEnd,
    progress: StreamProgress,
    piece_of: Callable[[Any], str | None],
    response: Any,
) -> bool:
    """Fold a batch of SSE lines (OpenAI chunks) into the stream's state; whether ``[DONE]``
    was among them (the lines after it are not read)."""
    for line in batch:
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            snippet = str(chunk)[:80]
            raise TransientResponseError(f"a stream chunk is not a JSON object: {snippet!r}")
        if error := chunk.get("error"):
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise openai.APIError(str(message), request=response.request, body=error)
        end.usage = chunk.get("usage") or end.usage
        end.timings = chunk.get("timings") or end.timings
        for choice in chunk.get("choices") or []:
            if piece := piece_of(choice):
                progress.add(piece)
            delta = choice.get("delta")
            if isinstance(delta, dict) and delta.get("tool_calls"):
                for _ in range(end.add_call_deltas(delta["tool_calls"])):
                    progress.add_call_piece()
            end.finish_reason = choice.get("finish_reason") or end.finish_reason
            found = choice.get("stop_reason") or choice.get("stopping_word")
            if isinstance(found, str):
                end.stop_reason = found
    return False


def delta_text(choice: Any) -> str | None:
    """The text of one chat-stream choice."""
    text = field_of(field_of(choice, "delta"), "content")
    return text if isinstance(text, str) else None


def choice_text(choice: Any) -> str | None:
    """The text of one text-completion-stream choice."""
    text = field_of(choice, "text")
    return text if isinstance(text, str) else None
