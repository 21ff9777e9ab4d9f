"""One exception hierarchy for everything apr-graph raises on purpose."""

from __future__ import annotations

__all__ = [
    "AprError",
    "AuthenticationError",
    "ConfigurationError",
    "ContextOverflowError",
    "InputError",
    "ModelCallError",
    "ModelNotFoundError",
    "ResponseFormatRefusedError",
    "ServerCapabilityError",
    "ServerUnreachableError",
    "StructuredOutputError",
]


class AprError(Exception):
    """Base class of apr-graph errors."""


class ConfigurationError(AprError, ValueError):
    """The call or the settings cannot work; the message says how to fix them."""


class InputError(AprError, ValueError):
    """The graph input is unusable (e.g. no ``task``); the message says what is expected."""


class BudgetExhaustedError(AprError):
    """A request was not sent because the run's token or time budget had run out."""


class ModelCallError(AprError):
    """A model request failed for good (after the retries that were worth making).

    Attributes:
        status_code: HTTP status of the last response, if there was one.
        attempts: how many requests were sent.
        url: the endpoint that was called.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        attempts: int = 1,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.attempts = attempts
        self.url = url


class AuthenticationError(ModelCallError):
    """The server refused the API key (401/403). Never retried."""


class ModelNotFoundError(ModelCallError):
    """The server does not serve the requested model (404)."""


class ContextOverflowError(ModelCallError):
    """The prompt plus ``max_tokens`` do not fit the server's context window. Never retried:
    shorten the input, give the server a larger context, or lower the token allowances."""

    requested_tokens: int | None = None
    """The request's size as the server counted it, when its message says (llama.cpp:
    "request (6558 tokens) exceeds ...", vLLM: "you requested 6558 tokens")."""


class ServerCapabilityError(ModelCallError):
    """The server cannot do what the request needs (tools, a structured-output mode, a
    model): a fixed configuration, never retried; the message names the server-side fix."""


class ResponseFormatRefusedError(ServerCapabilityError):
    """The server refused a ``response_format`` type and said so; the structured-output
    chain then tries the next mode."""


class ServerUnreachableError(ModelCallError):
    """No connection to the server could be made, even after retries."""


class StructuredOutputError(ModelCallError):
    """The model did not produce valid structured output, even after re-asks.

    Attributes:
        last_response: the last text the model returned.
        errors: the validation error of every attempt, oldest first.
        prompt_tokens / completion_tokens: what the failed attempts cost.
    """

    def __init__(
        self,
        message: str,
        *,
        last_response: str | None,
        errors: list[str],
        attempts: int,
        url: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        super().__init__(message, attempts=attempts, url=url)
        self.last_response = last_response
        self.errors = errors
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
