"""What one model call gives back: the ``Completion`` record, streams, usage, JSON in text.

Everything a server sends is untrusted: usage may be missing (then tokens are estimated, one
token per four characters, in one place: ``estimate_tokens``), a stream may break, a reply may
wrap its JSON in prose or code fences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import openai

from apr_graph.loops import Loop, LoopDetector
from apr_graph.sdk_compat import timed_out

__all__ = [
    "LOOPED",
    "Completion",
    "Message",
    "StreamEnd",
    "StreamProgress",
    "TransientResponseError",
    "cached_tokens",
    "choice_text",
    "delta_text",
    "estimate_tokens",
    "extract_json",
    "prompt_estimate",
    "read_stream",
    "strip_reasoning",
    "tool_calls_of",
    "usage_counts",
]

Message = dict[str, Any]

CHARS_PER_TOKEN = 4
"""The token estimate for servers that report no usage: an estimate beats a silent zero."""

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.I)


class TransientResponseError(Exception):
    """A reply that carries no usable completion (empty choices, broken body, cut stream)."""


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
        model: the model name sent.
        mode: how structured output was obtained, or ``text``.
        tool_calls: the tools the model asked to call (``id``, ``name``, ``arguments`` JSON).
        stop_reason: the stop string that ended a text completion, when the server says.
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
    first_token_at: float | None = None
    """When the first token arrived (streamed calls): service began, queueing ended."""
    unrun_tool_call: str | None = None
    """Set when the final reply is itself a tool call that was not run, saying which and why
    (``"a call to search, which is not a tool here (tools: multiply)"``; also past the call
    limit, or cut off by the token limit, which keeps ``finish_reason="length"``). The text
    is then no answer."""
    loop_saved_tokens: int = 0
    """Set when the reply was cut where it started repeating itself (``finish_reason``
    ``loop``): the tokens its allowance had left, which the server did not generate."""

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
        on_text: called with each piece of text as it arrives (on the run's loop).
        detect_loops: watch the text for degenerate repetition (``loops``): once found,
            ``loop`` says where, and the stream is closed there.
    """

    text: str = ""
    completion_tokens: int = 0
    started_at: float = 0.0
    requests: int = 0
    charged: bool = False
    on_text: Callable[[str], None] | None = None
    first_token_at: float | None = None
    detect_loops: bool = True
    loop: Loop | None = None
    """Where the text started repeating itself, once it did (``text`` then ends there)."""
    loop_tokens: int = 0
    """Tokens streamed when the loop was found (all paid for; the text keeps fewer)."""
    _detector: LoopDetector | None = field(default=None, repr=False)

    def add(self, piece: str) -> None:
        """One more piece of streamed text."""
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.text += piece
        self.completion_tokens += 1
        if self.on_text is not None:
            self.on_text(piece)
        if self.detect_loops and self.loop is None:
            if self._detector is None:
                self._detector = LoopDetector()
            if (found := self._detector.feed(piece)) is not None:
                self.loop, self.loop_tokens = found, self.completion_tokens

    def cut_at_loop(self) -> None:
        """Keep the text from before the loop (the repeated block said once)."""
        if self.loop is not None:
            self.text = self.text[: self.loop.keep]

    def add_call_piece(self) -> None:
        """One more streamed piece of a tool call: a token, but not text."""
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.completion_tokens += 1

    def restart(self, started_at: float) -> None:
        """A new request (a retry, or a tool loop's next round) begins: what the last one
        streamed is discarded, and this one's tokens are not charged yet."""
        self.text, self.completion_tokens, self.started_at = "", 0, started_at
        self.first_token_at = None
        self.charged = False
        self.loop, self.loop_tokens, self._detector = None, 0, None


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


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``: SDK models and plain JSON alike."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


LOOPED = "loop"
"""The ``finish_reason`` of a reply cut where it started repeating itself (apr-graph's own)."""


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
                await _drain(lines)
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


async def _drain(lines: Any) -> None:
    """Read a stream on to its end after ``[DONE]``, as the SDK does, so its connection goes
    back to the pool and the next request reuses it. Bounded, and never an error: a server
    that keeps the body open after ``[DONE]`` costs ``_DRAIN_S``, not a completed answer."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_DRAIN_S):
            async for _ in lines:
                pass


def _take_lines(
    batch: list[str],
    end: StreamEnd,
    progress: StreamProgress,
    piece_of: Callable[[Any], str | None],
    response: Any,
) -> bool:
    """Fold a batch of SSE lines into the stream's state; whether ``[DONE]`` was among them
    (the lines after it are not read)."""
    for line in batch:
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        _take(json.loads(data), end, progress, piece_of, response)
    return False


def _take(
    chunk: Any,
    end: StreamEnd,
    progress: StreamProgress,
    piece_of: Callable[[Any], str | None],
    response: Any,
) -> None:
    """Fold one streamed chunk into the stream's progress and end state."""
    if not isinstance(chunk, dict):
        raise TransientResponseError(f"a stream chunk is not a JSON object: {str(chunk)[:80]!r}")
    if chunk.get("error"):
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise openai.APIError(str(message), request=response.request, body=error)
    end.usage = chunk.get("usage") or end.usage
    end.timings = chunk.get("timings") or end.timings
    for choice in chunk.get("choices") or []:
        piece = piece_of(choice)
        if piece:
            progress.add(piece)
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("tool_calls"):
            for _ in range(end.add_call_deltas(delta["tool_calls"])):
                progress.add_call_piece()
        end.finish_reason = choice.get("finish_reason") or end.finish_reason
        found = choice.get("stop_reason") or choice.get("stopping_word")
        if isinstance(found, str):
            end.stop_reason = found


def delta_text(choice: Any) -> str | None:
    """The text of one chat-stream choice."""
    text = _field(_field(choice, "delta"), "content")
    return text if isinstance(text, str) else None


def choice_text(choice: Any) -> str | None:
    """The text of one text-completion-stream choice."""
    text = _field(choice, "text")
    return text if isinstance(text, str) else None


def estimate_tokens(text: str) -> int:
    """Tokens in ``text``, estimated for servers that report no usage."""
    return len(text) // CHARS_PER_TOKEN


def prompt_estimate(messages: Sequence[Message]) -> int:
    """The estimated prompt tokens of a chat request."""
    return sum(estimate_tokens(str(m.get("content") or "")) for m in messages)


def usage_counts(usage: Any, *, prompt: int, completion: int) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)`` from a reported usage, else the estimates."""
    reported_prompt = _field(usage, "prompt_tokens")
    reported_completion = _field(usage, "completion_tokens")
    if reported_prompt is None or reported_completion is None:
        return prompt, completion
    return int(reported_prompt), int(reported_completion)


def cached_tokens(usage: Any, timings: Any = None) -> int | None:
    """Prompt tokens served from the prefix cache: OpenAI/vLLM usage details, else llama.cpp
    ``timings.cache_n``; ``None`` when the server does not say."""
    cached = _field(_field(usage, "prompt_tokens_details"), "cached_tokens")
    if cached is not None:
        return int(cached)
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        return int(timings["cache_n"])
    return None


def tool_calls_of(message: Any) -> tuple[dict[str, str], ...]:
    """The tool calls of an assistant message as ``{"id", "name", "arguments"}``."""
    calls = []
    for call in _field(message, "tool_calls") or []:
        function = _field(call, "function")
        if function is not None:
            calls.append(
                {
                    "id": str(_field(call, "id") or ""),
                    "name": str(_field(function, "name")),
                    "arguments": str(_field(function, "arguments") or "{}"),
                }
            )
    return tuple(calls)


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
