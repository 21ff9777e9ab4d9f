"""Any LangChain chat model (``ChatOpenAI``, ``ChatOllama``, ...) as a transport.

``ChatModelTransport`` sends each request through the model's ``ainvoke`` / ``astream``; the
client front keeps everything else (the retry layer, budgets, structured output with
validation and re-asks, cancellation of streamed answers). Structured output uses the
schema-in-prompt mode, which every model supports; the model's own settings govern sampling
and length.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from apr_graph.errors import ConfigurationError
from apr_graph.limiter import AdaptiveLimiter
from apr_graph.llm import LLMClient
from apr_graph.responses import (
    Completion,
    StreamProgress,
    estimate_tokens,
    prompt_estimate,
    strip_reasoning,
    usage_counts,
)
from apr_graph.retry import CallBudget
from apr_graph.settings import AprSettings
from apr_graph.transport import ChatRequest, TextRequest, admit

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import BaseMessage

__all__ = ["ChatModelClient", "ChatModelTransport"]


def _usage(message: BaseMessage | None) -> dict[str, Any]:
    usage = getattr(message, "usage_metadata", None) or {}
    return {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
    }


class ChatModelTransport:
    """Requests through a LangChain ``BaseChatModel``, at most ``max_concurrency`` at once.

    Args:
        model: the chat model every role uses.
        settings: ``max_concurrency`` is used.
    """

    def __init__(self, model: BaseChatModel, settings: AprSettings) -> None:
        self.model = model
        self.settings = settings
        self._limit: AdaptiveLimiter | None = None

    @property
    def name(self) -> str:
        """The chat model's class name."""
        return f"LangChain {type(self.model).__name__}"

    def _limiter(self) -> AdaptiveLimiter:
        if self._limit is None:  # made on the client's loop, where it is used
            self._limit = AdaptiveLimiter(self.settings.max_concurrency)
        return self._limit

    async def chat(
        self, request: ChatRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """One ``astream`` (or, unstreamed, ``ainvoke``) of the model, tools bound if any."""
        from langchain_core.messages import convert_to_messages

        messages = convert_to_messages(list(request.messages))
        async with self._limiter():
            admit(budget)
            progress.restart(time.time())
            runnable: Any = self.model
            if request.tools:
                runnable = self.model.bind_tools(list(request.tools))
            if request.stream:
                reply = await _stream(runnable, messages, progress)
                text = progress.text
            else:
                reply = await runnable.ainvoke(messages)
                text = reply.content if isinstance(reply.content, str) else str(reply.content)
            prompt, completion = usage_counts(
                _usage(reply),
                prompt=prompt_estimate(request.messages),
                completion=estimate_tokens(text),
            )
            if budget is not None:
                progress.charged = True
                budget.charge(prompt + completion)
        calls = _tool_calls(reply)
        return Completion(
            text=strip_reasoning(text),
            finish_reason=_finish_reason(reply, calls),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=None,
            requests=1,
            started_at=progress.started_at,
            ended_at=time.time(),
            model=request.model,
            tool_calls=calls,
            first_token_at=progress.first_token_at,
        )

    async def complete(
        self, request: TextRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """Chat models have no raw text completions."""
        raise ConfigurationError(
            "a LangChain chat model cannot serve text completions (native mode needs an "
            "OpenAI-compatible /v1/completions server: use AprSettings(base_url=...))"
        )

    async def list_models(self) -> list[str]:
        """The one model this transport uses."""
        return [self.settings.model]

    async def capacity(self) -> int:
        """``max_concurrency``: a chat model does not say how much it can take."""
        return self.settings.max_concurrency

    def capacity_report(self) -> dict[str, Any]:
        """A chat model does not report its capacity: ``max_concurrency`` holds."""
        return {
            "width": None,
            "source": "a LangChain chat model does not report it",
            "limit": self.settings.max_concurrency,
        }

    def concurrency_limit(self) -> int:
        """Requests allowed in flight right now."""
        return self._limit.limit if self._limit is not None else self.settings.max_concurrency

    async def aclose(self) -> None:
        """Nothing to release: the chat model owns its connections."""
        self._limit = None


async def _stream(runnable: Any, messages: list[BaseMessage], progress: StreamProgress) -> Any:
    """Stream the model's reply into ``progress``; the chunks summed (LangChain joins the
    tool-call chunks by index). Cancelling this task closes the model's stream."""
    total: Any = None
    async for chunk in runnable.astream(messages):
        total = chunk if total is None else total + chunk
        if isinstance(chunk.content, str) and chunk.content:
            progress.add(chunk.content)
        elif getattr(chunk, "tool_call_chunks", None):
            progress.add_call_piece()
    return total


def _tool_calls(reply: Any) -> tuple[dict[str, str], ...]:
    """The calls of a reply as ``{"id", "name", "arguments"}``, arguments as the model wrote
    them: a streamed reply's chunks carry the raw text (its parsed ``tool_calls`` would
    complete a call cut off mid-arguments), and a call whose arguments did not parse keeps
    them as sent, so the tool loop tells the model what was wrong."""
    chunks = getattr(reply, "tool_call_chunks", None)
    if chunks:
        return tuple(
            {"id": str(c.get("id") or ""), "name": c["name"], "arguments": c.get("args") or "{}"}
            for c in chunks
            if c.get("name")
        )
    calls = [
        {"id": str(c.get("id") or ""), "name": c["name"], "arguments": json.dumps(c["args"])}
        for c in getattr(reply, "tool_calls", None) or []
    ]
    calls += [
        {"id": str(c.get("id") or ""), "name": c["name"], "arguments": str(c.get("args") or "")}
        for c in getattr(reply, "invalid_tool_calls", None) or []
        if c.get("name")
    ]
    return tuple(calls)


_CUT = {"length", "max_tokens"}
"""Finish reasons of a reply cut by its token limit (OpenAI and Ollama, Anthropic)."""


def _finish_reason(reply: Any, calls: tuple[dict[str, str], ...]) -> str:
    """``length`` when the model says it was cut (so a cut thread is retried, not taken as
    done), else ``tool_calls`` or ``stop``."""
    metadata = getattr(reply, "response_metadata", None) or {}
    for key in ("finish_reason", "stop_reason", "done_reason"):
        if metadata.get(key) in _CUT:
            return "length"
    return "tool_calls" if calls else "stop"


class ChatModelClient(LLMClient):
    """An ``LLMClient`` over a LangChain chat model (``ChatModelTransport``).

    Args:
        model: the chat model every role uses.
        settings: limits, retries and budgets (``base_url`` is not used).

    Example:
        >>> from langchain_openai import ChatOpenAI  # doctest: +SKIP
        >>> app = compile_apr_graph(client=ChatModelClient(ChatOpenAI(model="gpt-4.1-mini")))
    """

    _caller_context = True
    """The chat model's runs nest under the graph's (LangChain reads its parent run, and the
    callbacks of ``astream_events`` and tracing, from the context)."""

    def __init__(self, model: BaseChatModel, settings: AprSettings | None = None) -> None:
        own = {"structured_output": "prompt", "model": type(model).__name__}
        settings = (settings or AprSettings()).model_copy(update={**own, "probe_capacity": False})
        super().__init__(settings, transport=ChatModelTransport(model, settings))
        self.chat_model = model

    def for_run(self, settings: AprSettings) -> LLMClient:
        """This client for one run; a run cannot name another model (the chat model is the
        graph's only one).

        Raises:
            ConfigurationError: the run's context names a model.
        """
        for name in ("model", "planner_model", "worker_model", "synthesizer_model"):
            if getattr(settings, name) != getattr(self.settings, name):
                raise ConfigurationError(
                    f"{name} cannot be set per run on a graph built with model= (a LangChain "
                    f"chat model, {type(self.chat_model).__name__}): that model serves every "
                    f"call; drop {name} from the context, or build one graph per chat model"
                )
        return super().for_run(settings)
