"""What went wrong with a request, read from its status *and* body, and the error a caller sees.

Servers disagree on status codes (a LiteLLM proxy answers a wrong key with ``400``, llama.cpp a
missing ``--jinja`` with ``500``), so a failure is classified from both; only transient kinds
(connection, timeout, 408/409/429, other 5xx, broken replies) are worth a retry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import openai

from apr_graph.errors import (
    AprError,
    AuthenticationError,
    ContextOverflowError,
    ModelCallError,
    ModelNotFoundError,
    ResponseFormatRefusedError,
    ServerCapabilityError,
    ServerUnreachableError,
)
from apr_graph.responses import TransientResponseError
from apr_graph.retry import retry_after_s

__all__ = ["FailureKind", "classify", "one_line", "server_message", "to_error"]

FailureKind = Literal[
    "auth",
    "not_found",
    "context",
    "format",
    "tools",
    "timeout",
    "unreachable",
    "transient",
    "rejected",
]
"""``rejected``: the server refused this request for good (a 4xx apr cannot cure)."""

RETRYABLE: frozenset[FailureKind] = frozenset({"timeout", "unreachable", "transient"})

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_AUTH = re.compile(
    r"authenticat|unauthori[sz]ed|api[ _-]?key|invalid[ _-]token|no connected db", re.I
)
_CONTEXT = re.compile(
    r"context[ _](length|size|window)|exceeds? the (available|maximum) context|too many tokens"
    r"|prompt is too long|maximum context",
    re.I,
)
_UNKNOWN_MODEL = re.compile(
    r"invalid model name|model .{0,120}(does not exist|not found)|unknown model|is pinned to",
    re.I,
)
"""A 400 that refuses the model name: LiteLLM's "Invalid model name passed in model=...",
``transformers serve --force-model``'s "Server is pinned to 'X'; requested 'Y'."."""
_FORMAT = re.compile(r"response_format|json_schema|json schema|grammar|\bschema\b", re.I)
_TOOLS = re.compile(r"\btools?\b.*(requires?|not supported|unsupported|not enabled)|--jinja", re.I)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, line breaks included, made one space."""
    return " ".join(text.split())


def server_message(exc: openai.APIStatusError) -> str:
    """The error text of a failed response (OpenAI, vLLM, llama.cpp and FastAPI's
    ``detail`` body shapes), on one line: a LiteLLM proxy's 500 for a dead backend runs over
    several, blank ones among them, and an error is shown as one line."""
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or body.get("detail")
        if isinstance(message, dict):
            message = message.get("message")
        if message:
            return one_line(str(message))[:300]
    return one_line(str(exc.message))[:300]


def classify(
    exc: BaseException, *, has_format: bool = False, has_tools: bool = False
) -> FailureKind:
    """The kind of a request's failure; ``RETRYABLE`` kinds are worth another request."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "unreachable"
    if isinstance(exc, TransientResponseError):
        return "transient"
    if not isinstance(exc, openai.APIStatusError):
        return "rejected"
    status, body = exc.status_code, exc.body
    said = body.get("type") or body.get("code") if isinstance(body, dict) else None
    error_type = str(said or exc.type or exc.code or "")
    text = f"{error_type} {server_message(exc)}"
    if status in {401, 403} or (
        status == 400 and ("auth" in error_type.lower() or _AUTH.search(text))
    ):
        return "auth"
    if _CONTEXT.search(text) or "context_length_exceeded" in text:
        return "context"
    if has_tools and _TOOLS.search(text):
        return "tools"
    if has_format and status in {400, 422, 500, 501} and _FORMAT.search(text):
        return "format"
    if status == 404 or (status == 400 and _UNKNOWN_MODEL.search(text)):
        return "not_found"
    if status in _RETRYABLE_STATUS or status >= 500:
        return "transient"
    return "rejected"


_TOKENS = re.compile(r"(\d[\d,]*) tokens")
"""Token counts in a server's refusal of a request too long for its context."""


def to_error(
    exc: Exception,
    kind: FailureKind,
    *,
    url: str,
    model: str,
    attempts: int,
    timeout_s: float,
    retry_max_wait_s: float,
    redact: Callable[[str], str],
) -> AprError:
    """The apr-graph error a caller sees for ``exc`` after ``attempts`` requests."""
    if isinstance(exc, AprError):
        return exc
    sent = f"{attempts} request" + ("" if attempts == 1 else "s")
    if kind == "timeout":
        return ModelCallError(
            f"request to {url} timed out after {timeout_s:g}s ({sent}); raise "
            "request_timeout_s if the model is slow",
            attempts=attempts,
            url=url,
        )
    if kind == "unreachable":
        return ServerUnreachableError(
            f"cannot connect to {url} ({sent}): is the server running, and is the URL right "
            "(it usually ends in /v1)?",
            attempts=attempts,
            url=url,
        )
    if not isinstance(exc, openai.APIStatusError):
        return ModelCallError(
            f"{redact(str(exc))} (from {url}, {sent})", attempts=attempts, url=url
        )
    status = exc.status_code
    said = redact(server_message(exc))
    head = f"HTTP {status} from {url}"
    known: dict[FailureKind, tuple[type[ModelCallError], str]] = {
        "auth": (
            AuthenticationError,
            f"the server at {url} refused the API key (HTTP {status} after {sent}: {said}); "
            "check --api-key / OPENAI_API_KEY",
        ),
        "not_found": (ModelNotFoundError, f"{head} for model {model!r}: {said}"),
        "context": (
            ContextOverflowError,
            f"{head}: the request does not fit the model's context ({said}); shorten the task "
            "or context, give the server a larger context (llama.cpp: -c N), or lower the "
            "token allowances (planner/worker/synthesizer_max_tokens)",
        ),
        "tools": (
            ServerCapabilityError,
            f"{head}: the server cannot serve tool calls ({said}); enable them on the server "
            "(llama.cpp: start llama-server with --jinja) or build the graph without tools",
        ),
        "format": (
            ResponseFormatRefusedError,
            f"{head}: the server refused the response_format: {said}",
        ),
    }
    if kind in known:
        error, message = known[kind]
        found = error(message, status_code=status, attempts=attempts, url=url)
        if isinstance(found, ContextOverflowError):  # the largest count is the request's
            counts = [int(n.replace(",", "")) for n in _TOKENS.findall(said)]
            found.requested_tokens = max(counts, default=None)
        return found
    hint = ""
    delay = retry_after_s(exc)
    if delay is not None and delay > retry_max_wait_s:
        hint = f"; the server asked to wait {delay:g}s, beyond retry_max_wait_s"
    elif delay is not None and status in _RETRYABLE_STATUS | {503}:
        hint = f"; the server asked to wait {delay:g}s, beyond the run's deadline"
    return ModelCallError(
        f"{head} after {sent}: {said}{hint}", status_code=status, attempts=attempts, url=url
    )
