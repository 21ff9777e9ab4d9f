"""Any LangChain chat model (``ChatOpenAI``, ``ChatOllama``, ...) behind the client interface.

``ChatModelClient`` keeps everything ``LLMClient`` does around a request (the retry layer, the
concurrency limit, budgets, structured output with validation and re-asks, cancellation of
streamed answers) and replaces only the request itself with the model's ``ainvoke`` /
``astream``. Structured output uses the schema-in-prompt mode, which every model supports.
The model's own settings govern sampling and length.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage, convert_to_messages

from apr_graph.llm import (
    CallBudget,
    Completion,
    LLMClient,
    StreamProgress,
    _admit,
    _prompt_estimate,
    strip_reasoning,
)
from apr_graph.settings import AprSettings, Role

__all__ = ["ChatModelClient"]


def _usage(message: BaseMessage) -> tuple[int | None, int | None]:
    usage = getattr(message, "usage_metadata", None) or {}
    return usage.get("input_tokens"), usage.get("output_tokens")


class ChatModelClient(LLMClient):
    """The client interface over a LangChain ``BaseChatModel``.

    Args:
        model: the chat model every role uses.
        settings: limits, retries and budgets (``base_url`` and ``model`` are not used).

    Example:
        >>> from langchain_openai import ChatOpenAI  # doctest: +SKIP
        >>> app = compile_apr_graph(client=ChatModelClient(ChatOpenAI(model="gpt-4.1-mini")))
    """

    def __init__(self, model: BaseChatModel, settings: AprSettings | None = None) -> None:
        settings = settings or AprSettings()
        name = type(model).__name__
        settings = settings.model_copy(
            update={"base_url": f"langchain://{name}", "base_urls": [],
                    "structured_output": "prompt", "model": name,
                    "probe_capacity": False}
        )  # fmt: skip
        super().__init__(settings)
        self.chat_model = model

    async def list_models(self) -> list[str]:
        """The one model this client uses."""
        return [self.settings.model]

    async def _request_here(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        model: str,
        role: Role | str,
        max_tokens: int,
        response_format: dict[str, Any] | None,
        budget: CallBudget | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Completion:
        limit = self._limiter()
        runnable: Any = self.chat_model.bind_tools(list(tools)) if tools else self.chat_model
        async with limit:
            _admit(budget)
            started = time.time()
            reply = await runnable.ainvoke(convert_to_messages(list(messages)))
        text = reply.content if isinstance(reply.content, str) else str(reply.content)
        prompt, completion = _usage(reply)
        completion_tokens = completion if completion is not None else len(text) // 4
        prompt_tokens = prompt if prompt is not None else _prompt_estimate(messages)
        if budget is not None:
            budget.charge(prompt_tokens + completion_tokens)
        calls = tuple(
            {"id": str(c.get("id") or ""), "name": c["name"], "arguments": json.dumps(c["args"])}
            for c in getattr(reply, "tool_calls", None) or []
        )
        return Completion(strip_reasoning(text), "tool_calls" if calls else "stop", prompt_tokens,
                          completion_tokens, None, 1, started, time.time(), model,
                          tool_calls=calls)  # fmt: skip

    async def _stream_here(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        model: str,
        role: Role | str,
        max_tokens: int,
        progress: StreamProgress,
        budget: CallBudget | None = None,
    ) -> Completion:
        limit = self._limiter()
        progress.text, progress.completion_tokens = "", 0
        total: AIMessageChunk | None = None
        async with limit:
            _admit(budget)
            started = progress.started_at = time.time()
            # Cancelling this task closes the model's stream (and its HTTP response).
            async for chunk in self.chat_model.astream(convert_to_messages(list(messages))):
                total = chunk if total is None else total + chunk
                piece = chunk.content if isinstance(chunk.content, str) else ""
                if piece:
                    progress.add(piece)
            prompt, completion = _usage(total) if total is not None else (None, None)
            prompt_tokens = prompt if prompt is not None else _prompt_estimate(messages)
            completion_tokens = completion if completion is not None else progress.completion_tokens
            if budget is not None:
                progress.charged = True
                budget.charge(prompt_tokens + completion_tokens)
        return Completion(strip_reasoning(progress.text), "stop", prompt_tokens,
                          completion_tokens, None, 1, started, time.time(), model)  # fmt: skip
