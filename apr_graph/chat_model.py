"""Any LangChain chat model (``ChatOpenAI``, ``ChatOllama``, ...) as a transport.

The client front keeps retries, budgets, structured output (schema-in-prompt mode) and
cancellation. A request's output limit and temperature are set on a copy of the model, through
the fields it declares (``max_tokens``, ``max_output_tokens``, ``num_predict``,
``temperature``): as call arguments, ChatOllama would pass them to a client that refuses them.
A model that takes only its default temperature (OpenAI's gpt-5 reasoning models) needs
``AprSettings(temperature=1, vote_temperature=1)``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from apr_graph.errors import ConfigurationError
from apr_graph.limiter import AdaptiveLimiter
from apr_graph.llm import LLMClient
from apr_graph.responses import (
    LOOPED,
    Completion,
    Reply,
    StreamProgress,
    estimate_tokens,
    prompt_estimate,
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
    """Requests through a LangChain ``BaseChatModel`` (its ``astream`` / ``ainvoke``), at
    most ``settings.max_concurrency`` at once. Each runs in its caller's task and context, so
    the model's runs nest under the graph's (LangChain reads them from the context)."""

    def __init__(self, model: BaseChatModel, settings: AprSettings) -> None:
        self.model = model
        self.settings = settings
        self._limit = AdaptiveLimiter(settings.max_concurrency)  # serves any loop
        self._declared = type(model).model_fields
        self._max_tokens_field = next((f for f in _MAX_TOKENS_FIELDS if f in self._declared), "")

    @property
    def name(self) -> str:
        """The chat model's class name."""
        return f"LangChain {type(self.model).__name__}"

    async def chat(
        self, request: ChatRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        """One ``astream`` (or, unstreamed, ``ainvoke``) of the model, tools bound if any."""
        from langchain_core.messages import convert_to_messages

        messages = convert_to_messages(list(request.messages))
        async with self._limit:
            admit(budget)
            progress.restart(time.time())
            runnable: Any = self._model_for(request)
            if request.tools:
                runnable = runnable.bind_tools(list(request.tools))
            counted = None
            if request.stream:
                reply = await _stream(runnable, messages, progress)
                text = progress.text
                # Without usage: each chunk is a token at least, 4 characters one at most
                # (digits and code run denser than that).
                counted = max(progress.completion_tokens, estimate_tokens(text))
            else:
                reply = await runnable.ainvoke(messages)
                text = reply.content if isinstance(reply.content, str) else str(reply.content)
            calls = _tool_calls(reply)
            finish = LOOPED if progress.loop is not None else _finish_reason(reply, calls)
            answered = Reply(text, finish, _usage(reply), tool_calls=calls, counted=counted)
            return answered.completion(
                request.model, prompt_estimate(request.messages), progress, budget
            )

    def _model_for(self, request: ChatRequest) -> BaseChatModel:
        """The model with this request's output limit and temperature (a shallow copy: it
        shares the model's clients and connections)."""
        wanted = {self._max_tokens_field: request.max_tokens, "temperature": request.temperature}
        limits = {name: value for name, value in wanted.items() if name in self._declared}
        return self.model.model_copy(update=limits) if limits else self.model

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
        return self._limit.limit

    async def aclose(self) -> None:
        """Nothing to release: the chat model owns its connections."""


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
        if progress.loop is not None:  # leaving the loop closes the model's stream
            progress.cut_at_loop()
            break
    return total


def _tool_calls(reply: Any) -> tuple[dict[str, str], ...]:
    """The calls of a reply as ``{"id", "name", "arguments"}``, arguments as the model wrote
    them: a streamed reply's chunks carry the raw text (its parsed ``tool_calls`` would
    complete a call cut off mid-arguments), and a call whose arguments did not parse keeps
    them as sent, so the tool loop tells the model what was wrong."""

    def call(c: Any, arguments: str) -> dict[str, str]:
        return {"id": str(c.get("id") or ""), "name": c["name"], "arguments": arguments}

    if chunks := getattr(reply, "tool_call_chunks", None):
        return tuple(call(c, c.get("args") or "{}") for c in chunks if c.get("name"))
    parsed = getattr(reply, "tool_calls", None) or []
    invalid = getattr(reply, "invalid_tool_calls", None) or []
    return (
        *(call(c, json.dumps(c["args"])) for c in parsed),
        *(call(c, str(c.get("args") or "")) for c in invalid if c.get("name")),
    )


_MAX_TOKENS_FIELDS = ("max_tokens", "max_output_tokens", "num_predict")
"""A chat model's output-limit field: most providers'; Google's; Ollama's."""

_CUT = {"length", "max_tokens"}
"""Finish reasons of a reply cut by its token limit (OpenAI and Ollama, Anthropic)."""


def _finish_reason(reply: Any, calls: tuple[dict[str, str], ...]) -> str:
    """``length`` when the model says it was cut (so a cut thread is retried, not taken as
    done), else ``tool_calls`` or ``stop``."""
    metadata = getattr(reply, "response_metadata", None) or {}
    if any(metadata.get(key) in _CUT for key in ("finish_reason", "stop_reason", "done_reason")):
        return "length"
    return "tool_calls" if calls else "stop"


class ChatModelClient(LLMClient):
    """An ``LLMClient`` over a LangChain chat model (``ChatModelTransport``).

    Args:
        model: the chat model every role uses.
        settings: limits, retries and budgets (``base_url`` is not used). Without a
            ``temperature`` of their own, the one the model was made with holds.

    Example:
        >>> from langchain_openai import ChatOpenAI  # doctest: +SKIP
        >>> app = compile_apr_graph(client=ChatModelClient(ChatOpenAI(model="gpt-4.1-mini")))
    """

    def __init__(self, model: BaseChatModel, settings: AprSettings | None = None) -> None:
        settings = settings or AprSettings()
        own: dict[str, Any] = {"structured_output": "prompt", "model": type(model).__name__}
        # A temperature set when the model was made (by its caller, or by its own validators:
        # ChatOpenAI gives o1 models 1) was chosen for it; a declared default was not.
        temperature = getattr(model, "temperature", None)
        if (
            isinstance(temperature, float | int)
            and "temperature" in model.model_fields_set
            and "temperature" not in settings.model_fields_set
        ):
            own["temperature"] = float(temperature)
        settings = settings.model_copy(update={**own, "probe_capacity": False})
        super().__init__(settings, transport=ChatModelTransport(model, settings))
        self.chat_model = model

    def for_run(self, settings: AprSettings) -> LLMClient:
        """This client for one run, which cannot name another model (the chat model serves all).

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
