"""A thread's bounded tool loop: the model calls allowlisted LangChain tools until it answers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from apr_graph.events import emit
from apr_graph.llm import LLMClient
from apr_graph.responses import Completion
from apr_graph.retry import CallBudget
from apr_graph.settings import AprSettings

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

__all__ = ["tool_loop"]

_RESULT_CHARS = 8000
"""A tool result longer than this is cut: it goes back into the model's context."""


async def tool_loop(
    client: LLMClient,
    settings: AprSettings,
    budget: CallBudget,
    thread_id: str,
    messages: list[dict[str, Any]],
    tools: Sequence[BaseTool],
    allowance: int,
) -> Completion:
    """Let the model call ``tools`` until it answers, at most ``max_tool_calls`` calls; a
    failing or unknown tool is reported to the model, not raised. One ``Completion`` for all."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    by_name = {tool.name: tool for tool in tools}
    specs = [convert_to_openai_tool(tool) for tool in tools]
    conversation = list(messages)
    used = 0
    total: Completion | None = None
    while True:
        offer = specs if used < settings.max_tool_calls else None
        completion = await client.chat(
            conversation, role="worker", tools=offer, max_tokens=allowance, budget=budget
        )
        total = completion if total is None else total.plus(completion)
        if not completion.tool_calls or offer is None:
            return replace(total, text=completion.text, tool_calls=())
        conversation.append(_assistant_turn(completion))
        for call in completion.tool_calls:
            used += 1
            result, ok = await _call_tool(by_name, call, used, settings.max_tool_calls)
            emit("tool_call", id=thread_id, tool=call["name"], ok=ok)
            conversation.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def _assistant_turn(completion: Completion) -> dict[str, Any]:
    """The assistant message that asked for the tool calls, as the tools API wants it back."""
    calls = [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in completion.tool_calls
    ]
    return {"role": "assistant", "content": completion.text or None, "tool_calls": calls}


async def _call_tool(
    by_name: dict[str, BaseTool], call: dict[str, str], used: int, limit: int
) -> tuple[str, bool]:
    if used > limit:
        return f"not run: the limit of {limit} tool calls is reached; answer now", False
    tool = by_name.get(call["name"])
    if tool is None:
        return f"error: no tool named {call['name']!r}; available: {', '.join(by_name)}", False
    try:
        arguments = json.loads(call["arguments"] or "{}")
        result = await tool.ainvoke(arguments)
    except Exception as exc:  # a tool's failure is the model's to handle, not the run's
        return f"error: {type(exc).__name__}: {exc}", False
    return str(result)[:_RESULT_CHARS], True
