"""What the OpenAI SDK would send and raise, for requests sent without it (on aiohttp, by
``http_pool``): its headers, and its error classes built as its own client builds them, so
``failures.classify``, the retry policy and callers see what they would see from the SDK.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from functools import cache
from typing import Any, get_type_hints

import openai

__all__ = [
    "KEYLESS",
    "authorization",
    "sdk_headers",
    "sdk_request",
    "status_error",
    "timed_out",
    "transport_error",
]

_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


KEYLESS = "not-needed"
"""The key sent when none is given: the settings' default, which keyless local servers
ignore."""


def authorization(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``api_key``; an empty key sends ``KEYLESS``.

    Sending no header would not do: a LiteLLM proxy with a master key answers that with a
    bare 500, which reads as a broken server and is retried; an unknown key is a key error.
    """
    return {"Authorization": f"Bearer {(api_key or '').strip() or KEYLESS}"}


def sdk_headers(api_key: str) -> dict[str, str]:
    """What the SDK's client sends with every request: its user agent, the key, and the
    organization and project of the environment (``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``);
    not its ``X-Stainless-*`` telemetry."""
    headers = {
        "User-Agent": f"AsyncOpenAI/Python {openai.__version__}",
        "Content-Type": "application/json",
        **authorization(api_key),
    }
    for name, variable in (
        ("OpenAI-Organization", "OPENAI_ORG_ID"),
        ("OpenAI-Project", "OPENAI_PROJECT_ID"),
    ):
        if value := os.environ.get(variable):
            headers[name] = value
    return headers


@cache
def _sdk_http() -> Any:
    """The HTTP package whose request and response objects the SDK's errors carry (httpx, or
    httpx2 in later SDK versions)."""
    request_type = get_type_hints(openai.APIConnectionError.__init__)["request"]
    return sys.modules[request_type.__module__.partition(".")[0]]


def sdk_request(method: str, url: str) -> Any:
    """The SDK's request object for ``url`` (its errors carry one)."""
    return _sdk_http().Request(method, url)


def status_error(
    status: int, headers: Any, content: bytes, method: str, url: str
) -> openai.APIStatusError:
    """The SDK's error for a failed status: the class, message and body its client builds
    (``Error code: 429 - <message>``; ``body`` is the ``error`` object when there is one);
    its ``response`` has the status, headers and body received."""
    text = content.decode(errors="replace").strip()
    body: Any = text
    message = f"Error code: {status}"
    with contextlib.suppress(ValueError):
        body = json.loads(text)
    if isinstance(body, dict):
        body = body.get("error", body)
        said = body.get("message") if isinstance(body, dict) else None
        if isinstance(said, str) and said:
            message += f" - {said}"
    elif text:
        message += f" - {text[:300]}"
    fallback = openai.InternalServerError if status >= 500 else openai.APIStatusError
    kind = _STATUS_ERRORS.get(status, fallback)
    response = _sdk_http().Response(
        status, headers=list(headers.items()), content=content, request=sdk_request(method, url)
    )
    return kind(message, response=response, body=body)


def transport_error(exc: BaseException, method: str, url: str) -> Exception:
    """The SDK's error for a request that got no response (as its own client maps them):
    a timeout is ``APITimeoutError``, anything else ``APIConnectionError``."""
    if isinstance(exc, openai.APIError):
        return exc
    if timed_out(exc) and not _refused(exc):
        return openai.APITimeoutError(request=sdk_request(method, url))
    return openai.APIConnectionError(
        message=f"Connection error: {exc}", request=sdk_request(method, url)
    )


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a timeout: aiohttp's (all ``TimeoutError``), or one of an httpx
    family (matched by name)."""
    return isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower()


def _refused(exc: BaseException) -> bool:
    """Whether a socket error (not a timeout) lies under ``exc`` (a refused connection)."""
    seen: BaseException | None = exc.__cause__ or exc.__context__
    for _ in range(8):  # a chain is short; a cycle must not hang the error path
        if seen is None:
            break
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
