"""What one model call gives back: the ``Completion`` record, streams, usage, JSON in text.

Everything a server sends is untrusted: usage may be missing (tokens are then estimated), a
stream may break, a reply may wrap its JSON in prose or code fences.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from apr_graph.loops import Loop, LoopDetector, tidy_cut

if TYPE_CHECKING:
    from apr_graph.retry import CallBudget

__all__ = [
    "LOOPED",
    "Completion",
    "Message",
    "Reply",
    "StreamProgress",
    "TransientResponseError",
    "cached_tokens",
    "estimate_tokens",
    "extract_json",
    "field_of",
    "prompt_estimate",
    "strip_reasoning",
    "tool_calls_of",
    "usage_counts",
    "with_loop_saving",
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
    """Set when the final reply is itself a tool call that was not run (unknown tool, past the
    call limit, or cut off), saying which and why; the text is then no answer."""
    max_tokens_sent: int | None = None
    """The last request's output allowance, when lowered to fit the server's per-slot context."""
    loop_saved_tokens: int = 0
    """For a reply cut at a loop (``finish_reason`` ``loop``): the allowance left ungenerated."""

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
        copy_source: the request's own input, which the reply must not write out again
            ``copy_lines`` lines at a time (a thread's; 0 lines: not watched).
    """

    text: str = ""
    completion_tokens: int = 0
    started_at: float = 0.0
    requests: int = 0
    charged: bool = False
    on_text: Callable[[str], None] | None = None
    first_token_at: float | None = None
    detect_loops: bool = True
    copy_source: str = ""
    copy_lines: int = 0
    loop: Loop | None = None
    """Where the text started repeating itself, once it did (``text`` then ends there)."""
    loop_tokens: int = 0
    """Tokens streamed when the loop was found (all paid for; the text keeps fewer)."""
    _detector: LoopDetector | None = field(default=None, repr=False)

    def add(self, piece: str) -> None:
        """One more piece of streamed text."""
        self.add_call_piece()  # counted and timed as any token
        self.text += piece
        if self.on_text is not None:
            self.on_text(piece)
        if self.detect_loops and self.loop is None:
            if self._detector is None:
                self._detector = LoopDetector(self.copy_source, self.copy_lines)
            if (found := self._detector.feed(piece)) is not None:
                self.loop, self.loop_tokens = found, self.completion_tokens

    def cut_at_loop(self) -> None:
        """Keep the text from before the loop, or from before a copy of the input (tidied)."""
        if self.loop is not None:
            self.text = self.text[: self.loop.keep]
            if self.loop.copied_lines:
                self.text = tidy_cut(self.text)

    def add_call_piece(self) -> None:
        """One more streamed piece of a tool call: a token, but not text."""
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.completion_tokens += 1

    def restart(self, started_at: float) -> None:
        """A new request (a retry, a tool loop's next round) begins: the last one's text is
        discarded, and this one's tokens are not charged yet."""
        self.text, self.completion_tokens, self.started_at = "", 0, started_at
        self.first_token_at = None
        self.charged = False
        self.loop, self.loop_tokens, self._detector = None, 0, None


@dataclass
class Reply:
    """What one request's reply carried (streamed or not), made into its ``Completion``."""

    text: str
    finish_reason: str | None
    usage: Any
    timings: Any = None
    tool_calls: tuple[dict[str, str], ...] = ()
    stop_reason: str | None = None
    counted: int | None = None
    """Completion tokens as the client counted them (used when the server reports no usage)."""
    reasoning_kept: bool = False

    def completion(
        self, model: str, prompt_guess: int, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """The ``Completion``, its tokens charged to ``budget`` (call it before the
        concurrency slot is released, so a budget is never overshot by more than the
        requests in flight)."""
        counted = estimate_tokens(self.text) if self.counted is None else self.counted
        prompt, completion = usage_counts(self.usage, prompt=prompt_guess, completion=counted)
        if budget is not None:
            progress.charged = True  # before charging: the charge may stop the run
            budget.charge(prompt + completion)
        return Completion(
            text=self.text if self.reasoning_kept else strip_reasoning(self.text),
            finish_reason=self.finish_reason,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached_tokens(self.usage, self.timings),
            requests=1,
            started_at=progress.started_at,
            ended_at=time.time(),
            model=model,
            tool_calls=self.tool_calls,
            stop_reason=self.stop_reason,
            first_token_at=progress.first_token_at,
        )


def field_of(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``: SDK models and plain JSON alike."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


LOOPED = "loop"
"""The ``finish_reason`` of a reply cut where it started repeating itself (apr-graph's own)."""


def estimate_tokens(text: str) -> int:
    """Tokens in ``text``, estimated for servers that report no usage."""
    return len(text) // CHARS_PER_TOKEN


def prompt_estimate(messages: Sequence[Message]) -> int:
    """The estimated prompt tokens of a chat request."""
    return sum(estimate_tokens(str(m.get("content") or "")) for m in messages)


def usage_counts(usage: Any, *, prompt: int, completion: int) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)`` from a reported usage, else the estimates."""
    reported = field_of(usage, "prompt_tokens"), field_of(usage, "completion_tokens")
    if None in reported:
        return prompt, completion
    return int(reported[0]), int(reported[1])


def cached_tokens(usage: Any, timings: Any = None) -> int | None:
    """Prompt tokens served from the prefix cache: OpenAI/vLLM usage details, else llama.cpp
    ``timings.cache_n``; ``None`` when the server does not say."""
    cached = field_of(field_of(usage, "prompt_tokens_details"), "cached_tokens")
    if cached is not None:
        return int(cached)
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        return int(timings["cache_n"])
    return None


def tool_calls_of(message: Any) -> tuple[dict[str, str], ...]:
    """The tool calls of an assistant message as ``{"id", "name", "arguments"}``."""
    return tuple(
        {
            "id": str(field_of(call, "id") or ""),
            "name": str(field_of(function, "name")),
            "arguments": str(field_of(function, "arguments") or "{}"),
        }
        for call in field_of(message, "tool_calls") or []
        if (function := field_of(call, "function")) is not None
    )


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


def with_loop_saving(completion: Completion, allowance: int | None) -> Completion:
    """``completion``, with the tokens its allowance had left when a loop cut it."""
    if completion.finish_reason != LOOPED or not allowance:
        return completion
    return replace(completion, loop_saved_tokens=max(0, allowance - completion.completion_tokens))
