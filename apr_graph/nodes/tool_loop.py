"""A thread's bounded tool loop: the model calls allowlisted LangChain tools until it answers.

Calls come through the tools API, or, as many small models write them, as text: a JSON object
with ``name`` and ``arguments`` (or ``parameters``), bare, in a code fence, or between
``<tool_call>`` tags (Qwen, Hermes). A final reply that is itself a call that was not run is
flagged on the ``Completion`` (``unrun_tool_call``), never passed off as an answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from apr_graph.events import emit
from apr_graph.llm import LLMClient
from apr_graph.responses import Completion, StreamProgress
from apr_graph.retry import CallBudget
from apr_graph.settings import AprSettings

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

__all__ = ["TextCalls", "read_text_calls", "run_call", "tool_loop", "tools_note"]

_RESULT_CHARS = 8000
"""A tool result longer than this is cut: it goes back into the model's context."""

_DESCRIPTION_CHARS = 120
"""A tool's description in the note is its first line, at most this long."""

_DECODER = json.JSONDecoder(strict=False)

_REMARK_CHARS = 120
"""A fenced or bare call still counts when at most one short line follows it ("This will
compute ..."); a longer text after it is an answer that merely shows a call."""

_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_FENCED = re.compile(r"```[\w-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_LINE_START = re.compile(r"^[ \t]*[{\[]", re.M)


def tools_note(tools: Sequence[BaseTool], *, unit: str = "subtask") -> str:
    """The note that tells a model which tools exist and when to use them; ``unit`` is what
    the reader works on ("subtask" for a thread, "task" for a planner)."""
    lines = ["Tools you can call:"]
    for tool in tools:
        first = next((s.strip() for s in (tool.description or "").splitlines() if s.strip()), "")
        if len(first) > _DESCRIPTION_CHARS:
            first = first[: _DESCRIPTION_CHARS - 3] + "..."
        lines.append(f"- {tool.name}: {first}".rstrip(": "))
    lines.append(
        f"Call a tool when the {unit} needs information or computation it provides; "
        "reply with the answer otherwise."
    )
    return "\n".join(lines)


async def tool_loop(
    client: LLMClient,
    settings: AprSettings,
    budget: CallBudget,
    thread_id: str,
    messages: list[dict[str, Any]],
    tools: Sequence[BaseTool],
    allowance: int,
    *,
    progress: StreamProgress | None = None,
    role: str = "worker",
) -> Completion:
    """Let the model call ``tools`` until it answers, at most ``max_tool_calls`` calls (a
    failing or unknown tool is reported to the model, not raised; a call past the limit is
    answered "answer now" once): one ``Completion`` for all. The tools note ends the last
    message, so the shared system prefix stays the same. ``role``: whose model answers (a
    thread's, or the planner's for a direct answer)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    by_name = {tool.name: tool for tool in tools}
    specs = [convert_to_openai_tool(tool) for tool in tools]
    conversation = _with_note(
        messages, tools_note(tools, unit="subtask" if role == "worker" else "task")
    )
    used, limit, told = 0, settings.max_tool_calls, False
    total: Completion | None = None
    while True:
        offer = specs if used < limit else None
        completion = await client.chat(
            conversation,
            role=role,
            thread=thread_id,
            tools=offer,
            max_tokens=allowance,
            budget=budget,
            progress=progress,
        )
        total = completion if total is None else total.plus(completion)
        calls, unrun, as_text = _requested(completion, by_name)
        if calls and offer is None and not told:  # told once to answer with what it has
            told, used = True, limit + 1
        elif calls and offer is None:
            names = ", ".join(dict.fromkeys(c["name"] for c in calls))
            calls, unrun = [], f"a call to {names} after the limit of {limit} tool calls"
        if not calls:
            return replace(total, text=completion.text, tool_calls=(), unrun_tool_call=unrun)
        results = []
        for call in calls:
            used += 1
            result, ok = await _call_tool(by_name, call, used, limit)
            emit("tool_call", id=thread_id, tool=call["name"], ok=ok)
            results.append(result)
        conversation += _turns(completion, calls, results, as_text=as_text)


def _with_note(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    """``messages`` with ``note`` after the last user message's text (a copy)."""
    conversation = list(messages)
    last = conversation[-1] if conversation else {}
    if last.get("role") == "user" and isinstance(last.get("content"), str):
        conversation[-1] = {**last, "content": f"{last['content']}\n\n{note}"}
    else:
        conversation.append({"role": "user", "content": note})
    return conversation


def _requested(
    completion: Completion, by_name: dict[str, BaseTool]
) -> tuple[list[dict[str, str]], str | None, bool]:
    """The calls to run, why the reply is an unrun call (or ``None``), and whether the calls
    were written as text."""
    cut = completion.finish_reason == "length"
    if completion.tool_calls:
        calls = list(completion.tool_calls)
        if cut and not all(_complete(c["arguments"]) for c in calls):
            # Cut mid-arguments: never run half a call; the worker retries with more room.
            names = ", ".join(c["name"] for c in calls)
            return [], f"a call to {names} cut off by the token limit", False
        return calls, None, False
    found = read_text_calls(completion.text, by_name)
    if found.calls:
        return found.calls, None, True
    if found.unfinished is not None:
        how = "cut off by the token limit" if cut else "left unfinished"
        return [], f"a call to {found.unfinished} written as text, {how}", True
    if found.unknown:
        names = ", ".join(found.unknown)
        known = ", ".join(by_name)
        return [], f"a call to {names}, which is not a tool here (tools: {known})", True
    return [], None, False


def _complete(arguments: str) -> bool:
    try:
        json.loads(arguments or "{}", strict=False)
    except ValueError:
        return False
    return True


def _turns(
    completion: Completion, calls: list[dict[str, str]], results: list[str], *, as_text: bool
) -> list[dict[str, Any]]:
    """The assistant turn that asked for ``calls`` and the turn(s) that answer them."""
    if not as_text:
        asked = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in calls
        ]
        return [
            {"role": "assistant", "content": completion.text or None, "tool_calls": asked},
            *(
                {"role": "tool", "tool_call_id": c["id"], "content": r}
                for c, r in zip(calls, results, strict=True)
            ),
        ]
    # Calls written as text: results go back as a user turn in the Qwen/Hermes format (what
    # Qwen's template renders for tool messages; valid on every server). A ``tool`` turn would
    # need ``tool_calls`` the model never made; templates without tool support reject it.
    responses = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
    return [
        {"role": "assistant", "content": completion.text},
        {"role": "user", "content": responses},
    ]


async def run_call(
    tools: Sequence[BaseTool], call: dict[str, str], thread_id: str
) -> tuple[str, bool]:
    """Run one ``{"name", "arguments"}`` call of ``tools`` outside a model's loop: its result
    (or the error) and whether it worked; a ``tool_call`` event says so."""
    result, ok = await _call_tool({tool.name: tool for tool in tools}, call, 1, 1)
    emit("tool_call", id=thread_id, tool=call["name"], ok=ok)
    return result, ok


async def _call_tool(
    by_name: dict[str, BaseTool], call: dict[str, str], used: int, limit: int
) -> tuple[str, bool]:
    if used > limit:
        return f"not run: the limit of {limit} tool calls is reached; answer now", False
    tool = by_name.get(call["name"])
    if tool is None:
        return f"error: no tool named {call['name']!r}; available: {', '.join(by_name)}", False
    try:
        arguments = json.loads(call["arguments"] or "{}", strict=False)
        result = await tool.ainvoke(arguments)
    except Exception as exc:  # a tool's failure is the model's to handle, not the run's
        return f"error: {type(exc).__name__}: {exc}", False
    return str(result)[:_RESULT_CHARS], True


# -- tool calls written as text ------------------------------------------------------------


@dataclass(frozen=True)
class TextCalls:
    """What a reply's text asks for.

    Attributes:
        calls: calls of allowlisted tools, as ``{"id", "name", "arguments"}``, to run.
        unknown: names of call-shaped objects that name no allowlisted tool (not run).
        unfinished: the tool named by a call whose JSON breaks off (cut by the token limit).
    """

    calls: list[dict[str, str]]
    unknown: list[str]
    unfinished: str | None = None


def read_text_calls(text: str, tools: Sequence[str] | dict[str, Any]) -> TextCalls:
    """The tool calls a reply writes as text instead of using the tools API.

    A call is a JSON object with a string ``name`` and ``arguments`` or ``parameters`` (an
    object or a JSON string; a ``{"function": {...}}`` wrapper is unwrapped), or a list of
    them: between ``<tool_call>`` tags anywhere, else in code fences or bare when they end the
    reply (a short remark tolerated). A call to a name not in ``tools`` is only reported.
    """
    names = set(tools)
    for blocks, anywhere in (
        ([(m.end(), m.group(1)) for m in _TAGGED.finditer(text)], True),
        ([(m.end(), m.group(1)) for m in _FENCED.finditer(text)], False),
        (_bare(text), False),
    ):
        found = [(end, item) for end, inner in blocks for item in _calls_in(inner, names)]
        if not found:
            continue
        if not anywhere and not _ends_reply(text, max(end for end, _ in found)):
            return TextCalls([], [])
        calls = [item for _, item in found if isinstance(item, dict)]
        known = [c for c in calls if c["name"] in names]
        cut = next((item for _, item in found if isinstance(item, str)), None)
        if known or cut is None:
            for number, call in enumerate(known, 1):
                call["id"] = f"text_call_{number}"
            return TextCalls(known, [c["name"] for c in calls if c["name"] not in names])
        return TextCalls([], [], unfinished=cut)
    return TextCalls([], [])


def _bare(text: str) -> list[tuple[int, str]]:
    """``(end, JSON text)`` of each JSON value that starts a line; one that does not parse
    runs to the end of the reply (it may be a cut call)."""
    found: list[tuple[int, str]] = []
    position = 0
    for match in _LINE_START.finditer(text):
        start = match.end() - 1
        if start < position:
            continue  # inside a value already taken
        try:
            _, end = _decode(text, start)
        except ValueError:  # not JSON, or a call cut off: it runs to the end, if anything
            found.append((len(text), text[start:]))
            continue
        found.append((end, text[start:end]))
        position = end
    return found


def _calls_in(inner: str, names: set[str]) -> Iterator[dict[str, str] | str]:
    """The call-shaped objects in one block's JSON (several in a row, or a list, allowed): a
    call dict each, or, for a call whose JSON breaks off, the name of its tool."""
    from langchain_core.utils.json import parse_json_markdown, parse_partial_json

    try:
        values = parse_json_markdown(inner, parser=_values)
    except ValueError:
        try:  # close what a cut-off reply left open, to see what it was writing
            values = [parse_json_markdown(inner, parser=parse_partial_json)]
        except ValueError:
            return
        for item in _flat(values):
            call = _as_call(item, partial=True)
            if call is not None and (call["name"] in names or call["arguments"] != "{}"):
                yield call["name"]
                return
        return
    for item in _flat(values):
        call = _as_call(item)
        if call is not None:
            yield call


def _values(raw: str) -> list[Any]:
    """Every JSON value in ``raw``, one after another (a model may write one call a line)."""
    values, position, raw = [], 0, raw.strip()
    while position < len(raw):
        value, position = _decode(raw, position)
        values.append(value)
        while position < len(raw) and raw[position] in " \t\r\n,":
            position += 1
    return values


def _decode(text: str, start: int) -> tuple[Any, int]:
    """The JSON value at ``start`` and where it ends. A value opened with ``{{`` is read from
    its second brace, with the closing braces after it: Qwen2.5's chat template shows the
    call format as ``{{"name": ..., "arguments": ...}}``, and the model writes it so."""
    if not text.startswith("{{", start):
        return _DECODER.raw_decode(text, start)
    value, end = _DECODER.raw_decode(text, start + 1)
    if not text.startswith("}", end):
        raise ValueError("a doubled opening brace without a doubled closing one")
    while text.startswith("}", end):
        end += 1
    return value, end


def _flat(values: list[Any]) -> Iterator[Any]:
    for value in values:
        yield from value if isinstance(value, list) else [value]


def _as_call(item: Any, *, partial: bool = False) -> dict[str, str] | None:
    """``{"name", "arguments"}`` when ``item`` has the shape of a call, else ``None``."""
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item["arguments"] if "arguments" in item else item.get("parameters")
    if arguments is None and partial:
        arguments = {}
    if not isinstance(arguments, dict | str):
        return None
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"name": item["name"], "arguments": text}


def _ends_reply(text: str, end: int) -> bool:
    """Whether what follows position ``end`` is nothing, or one short closing remark."""
    rest = text[end:].strip().strip("`").strip()
    return not rest or ("\n" not in rest and len(rest) <= _REMARK_CHARS)
