"""The script of a test server: what it received, which rule answers, and with what reply.

Nothing here touches HTTP; ``wire`` turns a ``Reply`` into bytes and ``server`` serves it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apr_graph.testing.roles import ROLES, role_of, text_of

__all__ = ["Pacer", "RecordedRequest", "Reply", "ReplyFactory", "Rule"]


@dataclass
class Reply:
    """What the server answers to one request.

    Attributes:
        content: message text; a dict or list is sent as its JSON text.
        status: HTTP status. Non-2xx statuses send an OpenAI-style error body.
        error_message: the error text of a non-2xx reply.
        headers: extra response headers (e.g. ``{"Retry-After": "1"}``).
        delay_s: seconds to wait before answering (per request: concurrent requests overlap).
        finish_reason: ``stop``, ``length``, ...
        body: raw body sent instead of a completion (HTML, broken JSON...).
        empty_choices: answer with ``"choices": []``.
        usage: override of the usage object; by default tokens are counted as words.
        extra: extra top-level fields of the completion (e.g. llama.cpp ``timings``).
        chunk_delay_s: when streamed, the pause before each chunk (a decode step); a client
            that hangs up is noticed at the next chunk and recorded with status 499.
        cut_stream_after: when streamed, close the connection after this many content chunks,
            without a finish_reason (a stream cut mid-way).
        tool_calls: tool calls the assistant makes, as ``{"name": ..., "arguments": {...}}``
            (a string is sent as it is: arguments cut off, or not JSON); ``finish_reason``
            becomes ``tool_calls`` unless set to another than ``stop``. Streamed, they follow
            the content, one call after another, their arguments in pieces of a few
            characters.
    """

    content: str | dict[str, Any] | list[Any] | None = None
    status: int = 200
    error_message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    finish_reason: str = "stop"
    body: str | bytes | None = None
    empty_choices: bool = False
    usage: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    chunk_delay_s: float = 0.0
    cut_stream_after: int | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message content as sent."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return json.dumps(self.content)


class Pacer:
    """Releases a reply's tokens; this base releases them at once (no model latency)."""

    def wait(self, tokens: int) -> None:
        """Block until ``tokens`` output tokens exist."""

    def __enter__(self) -> Pacer:
        return self

    def __exit__(self, *exc: object) -> None:
        """The reply is over (finished, or the client hung up)."""


@dataclass
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    started_at: float
    ended_at: float | None = None
    status: int | None = None
    peer: tuple[str, int] | None = None
    """The client's address and port: requests on one kept-alive connection share it."""
    streamed: int = 0
    """Content pieces (words) of a streamed reply written before it ended or the client hung
    up."""

    @property
    def role(self) -> str | None:
        """The apr-graph call this request is (``planner``, ``worker``, ``synthesizer``, ...),
        read from its body as ``apr_graph.testing.roles`` says; ``None`` for other requests."""
        return role_of(self.body)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The chat messages of the request."""
        if not self.body:
            return []
        return list(self.body.get("messages") or [])

    @property
    def system_message(self) -> str:
        """Text of the first system message (a planner's and a direct answer's differ)."""
        for message in self.messages:
            if message.get("role") == "system":
                return text_of(message.get("content"))
        return ""

    @property
    def last_user_message(self) -> str:
        """Text of the last user message (for ``/completions``: the prompt)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return text_of(message.get("content"))
        return self.prompt

    @property
    def prompt(self) -> str:
        """The prompt of a ``/completions`` request."""
        prompt = (self.body or {}).get("prompt")
        return prompt if isinstance(prompt, str) else ""

    @property
    def all_text(self) -> str:
        """All message texts joined (or the prompt), for matching."""
        return "\n".join(text_of(m.get("content")) for m in self.messages) or self.prompt


ReplyFactory = Callable[[RecordedRequest], Reply]


@dataclass
class Rule:
    """Which requests get which reply. The first rule that matches and has uses left answers.

    Attributes:
        reply: a ``Reply``, or a function of the request returning one.
        role: match the request's role (``planner``, ``worker``, ``synthesizer``, ...; see
            ``RecordedRequest.role``); a role no request is read as is a ``ValueError``.
        contains: match a substring of the last user message.
        pattern: match a regular expression anywhere in the messages.
        where: any other predicate on the request.
        times: how many requests this rule answers; ``None`` for unlimited.
    """

    reply: Reply | ReplyFactory
    role: str | None = None
    contains: str | None = None
    pattern: str | None = None
    where: Callable[[RecordedRequest], bool] | None = None
    times: int | None = None
    hits: int = 0

    def __post_init__(self) -> None:
        # A role no request is read as would never match: say so now, not as a 400 later.
        if self.role is not None and self.role not in ROLES:
            raise ValueError(
                f"Rule(role={self.role!r}): no request is read as that role; use one of "
                f"{', '.join(ROLES)} (the judge and the verifier are 'synthesizer'), or `where=`"
            )

    def matches(self, request: RecordedRequest) -> bool:
        """Whether this rule answers ``request``."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.role is not None and request.role != self.role:
            return False
        if self.contains is not None and self.contains not in request.last_user_message:
            return False
        if self.pattern is not None and not re.search(self.pattern, request.all_text, re.S):
            return False
        return self.where is None or self.where(request)

    def answer(self, request: RecordedRequest) -> Reply:
        """The reply for ``request``."""
        return self.reply(request) if callable(self.reply) else self.reply
