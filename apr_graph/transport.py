"""The interface between the client front (``LLMClient``) and whatever serves the model.

A transport sends *one* request and reports what came back; the front owns retries, error
classification and structured output. Every method runs on its caller's event loop, and one
transport may serve several loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from apr_graph.errors import BudgetExhaustedError
from apr_graph.responses import Completion, Message, StreamProgress
from apr_graph.retry import CallBudget

__all__ = ["ChatRequest", "TextRequest", "Transport", "admit"]


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request, as the front wants it sent.

    Attributes:
        role: which of apr-graph's calls this is (``planner``, ``worker``, ...), for a
            transport's own use; it is not sent to a server.
        stream: stream the answer (cancelling closes the response).
        response_format: an OpenAI ``response_format`` object, or ``None``.
        tools: OpenAI tool specs the model may call, or ``None``.
        thread: the thread the call is for (a subtask id, ``"direct"``), if any; not sent.
    """

    messages: Sequence[Message]
    model: str
    role: str
    max_tokens: int
    temperature: float
    stream: bool = False
    response_format: dict[str, Any] | None = None
    tools: Sequence[dict[str, Any]] | None = None
    thread: str | None = None


@dataclass(frozen=True)
class TextRequest:
    """One streamed text completion (``/v1/completions``) that ends at a stop string."""

    prompt: str
    model: str
    role: str
    max_tokens: int
    temperature: float
    stop: Sequence[str] = ()
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Server-specific body fields (e.g. vLLM's ``skip_special_tokens``), sent as given."""
    thread: str | None = None
    """The thread the call is for, if any; not sent."""


class Transport(Protocol):
    """Sends single requests to a model; raises what its backend raises on failure."""

    @property
    def name(self) -> str:
        """Where requests go, for messages (a URL, or the chat model's class)."""

    async def chat(
        self, request: ChatRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """Send one chat request; ``progress`` sees streamed text as it arrives."""

    async def complete(
        self, request: TextRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """Send one streamed text completion request."""

    async def list_models(self) -> list[str]:
        """The model names the backend offers."""

    async def capacity(self) -> int:
        """How many requests may be in flight at once (probed once where possible)."""

    def capacity_report(self) -> dict[str, Any]:
        """What is known of the capacity: ``width`` (``None``: unknown), ``source``, ``limit``."""

    def concurrency_limit(self) -> int:
        """Requests allowed in flight right now (lowered after pushback)."""

    async def aclose(self) -> None:
        """Release connections; the transport may be used again afterwards."""


def admit(budget: CallBudget | None) -> None:
    """Refuse to send a request once the run's budget has run out."""
    if budget is not None and not budget.admits():
        raise BudgetExhaustedError("the run's budget ran out before this request was sent")
