"""Structured output that works on every common backend, validated, with re-asks.

Modes, tried in order and remembered per endpoint and model: ``json_schema``, ``json_object``
with the schema, then the schema in the prompt. A mode is abandoned when the server refuses it
and says so, or ignores it: a reply in prose, or (``json_schema``) JSON the schema forbids in a
reply that was not cut off. Every answer is validated; an invalid one is re-asked with the
error shown to the model, but a reply cut off at the token limit is never pasted back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from apr_graph.errors import ModelCallError, ResponseFormatRefusedError, StructuredOutputError
from apr_graph.responses import LOOPED, Completion, Message, StreamProgress, extract_json
from apr_graph.retry import CallBudget
from apr_graph.settings import AprSettings

__all__ = ["ChatCall", "StructuredMode", "StructuredOutput", "repair_message", "schema_instruction"]

T = TypeVar("T", bound=BaseModel)
StructuredMode = Literal["json_schema", "json_object", "prompt"]
MODE_CHAIN: tuple[StructuredMode, ...] = ("json_schema", "json_object", "prompt")

ChatCall = Callable[..., Awaitable[Completion]]
"""``chat(messages, *, role, max_tokens, response_format, budget, progress) -> Completion``."""

_NO_JSON = "not valid JSON: the reply contains no JSON object"
_CUT_OFF = "your JSON was cut off at the output-token limit; reply with a shorter JSON object"
_LOOPED = (
    "your JSON began repeating itself and was cut off there; reply with a shorter JSON object "
    "that says each thing once"
)


class _ModeRejectedError(Exception):
    """The server refused this mode, or ignored it (``ignored``); carries what it cost."""

    def __init__(self, spent: Completion, *, ignored: bool = False) -> None:
        super().__init__("mode rejected")
        self.spent = spent
        self.ignored = ignored


class StructuredOutput:
    """The structured-output chain of one client: ``settings.structured_output`` (``auto`` or
    a fixed mode) and ``max_repairs``; ``where``, the endpoint's name (for messages and the
    per-endpoint memory)."""

    def __init__(self, settings: AprSettings, where: str) -> None:
        self.settings = settings
        self.where = where
        self.modes: dict[str, StructuredMode] = {}

    async def __call__(
        self,
        chat: ChatCall,
        messages: Sequence[Message],
        output_type: type[T],
        *,
        role: str,
        model: str | None = None,
        schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        budget: CallBudget | None = None,
        progress: StreamProgress | None = None,
    ) -> tuple[T, Completion]:
        """Ask for JSON matching ``output_type`` through ``chat`` and return it validated;
        ``model``: the model ``chat`` sends (default: the settings' for ``role``), whose mode
        is remembered; ``progress`` is passed to every request (it restarts with each)."""
        schema = schema or output_type.model_json_schema()
        model = model or self.settings.model_for(role)
        key = f"{self.where}|{model}"
        modes = MODE_CHAIN
        if self.settings.structured_output != "auto":
            modes = (self.settings.structured_output,)
        elif key in self.modes:
            modes = (self.modes[key],)
        ask = partial(chat, role=role, max_tokens=max_tokens, budget=budget, progress=progress)
        spent: Completion | None = None
        queue = list(modes)
        while queue:
            mode = queue.pop(0)
            try:
                value, completion = await self._in_mode(
                    ask, mode, messages, output_type, schema, model
                )
            except _ModeRejectedError as rejected:
                spent = rejected.spent if spent is None else spent.plus(rejected.spent)
                if rejected.ignored:  # one ignored response_format means all are ignored
                    queue = ["prompt"]
                continue
            self.modes[key] = mode
            return value, completion if spent is None else spent.plus(completion)
        raise ModelCallError(
            f"the server at {self.where} rejected every structured-output mode "
            f"({', '.join(modes)})",
            status_code=400,
            attempts=spent.requests if spent is not None else 1,
            url=self.where,
        )

    async def _in_mode(
        self,
        chat: ChatCall,
        mode: StructuredMode,
        messages: Sequence[Message],
        output_type: type[T],
        schema: dict[str, Any],
        model: str,
    ) -> tuple[T, Completion]:
        conversation = [dict(m) for m in messages]
        response_format = {  # None: the schema goes in the prompt only
            "json_schema": {
                "type": "json_schema",
                "json_schema": {"name": output_type.__name__, "schema": schema},
            },
            "json_object": {"type": "json_object", "schema": schema},
        }.get(mode)
        if mode != "json_schema":
            # json_object needs the word JSON in the prompt (OpenAI), and prompt mode needs
            # the schema itself; both gain from seeing it.
            first = conversation[0]
            conversation[0] = {**first, "content": first["content"] + schema_instruction(schema)}
        auto = self.settings.structured_output == "auto"
        errors: list[str] = []
        total: Completion | None = None
        before: str | None = None  # the reply before this one
        for _ in range(self.settings.max_repairs + 1):
            try:
                completion = await chat(conversation, response_format=response_format)
            except ResponseFormatRefusedError as exc:
                now = time.time()
                zero = Completion("", None, 0, 0, None, exc.attempts, now, now, model, mode)
                raise _ModeRejectedError(zero if total is None else total.plus(zero)) from exc
            total = completion if total is None else total.plus(completion)
            outcome, broken = _validate(completion, output_type)
            schema_held = mode != "json_schema" or _fits(completion, schema)
            if isinstance(outcome, BaseModel):
                if schema_held or not auto:
                    return outcome, replace(total, mode=mode)
                # The output type took it, the schema sent forbids it: the server dropped it.
                raise _ModeRejectedError(total, ignored=True)
            dropped = not schema_held or outcome == _NO_JSON or (mode == "json_schema" and broken)
            if dropped and response_format is not None and auto:
                # Prose, or JSON the schema forbids, not cut off: constrained decoding yields
                # neither, so the server dropped the response_format without a word; re-asking
                # without the schema in sight would only repair blind.
                raise _ModeRejectedError(total, ignored=True)
            errors.append(outcome)
            if completion.text == before:
                break  # the same reply to the re-ask: asking again would get it once more
            before = completion.text
            if outcome in (_CUT_OFF, _LOOPED):
                # Pasting a cut-off reply back would only fill the context: ask afresh.
                last = conversation[-1]
                if outcome not in str(last["content"]):
                    conversation[-1] = {**last, "content": f"{last['content']}\n\n({outcome})"}
                continue
            conversation.append({"role": "assistant", "content": completion.text[:4000]})
            conversation.append(repair_message(outcome))
        raise StructuredOutputError(
            f"the model gave no valid {output_type.__name__} after "
            f"{len(errors)} attempts ({mode} mode); last error: {errors[-1]}",
            last_response=total.text if total is not None else None,
            errors=errors,
            attempts=len(errors),
            url=self.where,
            prompt_tokens=total.prompt_tokens if total else 0,
            completion_tokens=total.completion_tokens if total else 0,
        )


_VALIDATOR_ERRORS = frozenset({"value_error", "assertion_error"})
"""Pydantic error types of a model's own validators: rules a JSON schema cannot state, which
constrained decoding does not enforce, so breaking them says nothing about the server."""


_LIMITS = frozenset(
    {"maxLength", "minLength", "maxItems", "minItems", "maximum", "minimum", "pattern"}
)
"""Keywords some engines' constrained decoding does not enforce: breaking them alone says
nothing about whether the server applied the schema."""


def _structure(schema: Any) -> Any:
    """``schema`` without ``_LIMITS``: the keys, types and values any constrained decoder
    enforces."""
    if isinstance(schema, dict):
        return {k: _structure(v) for k, v in schema.items() if k not in _LIMITS}
    if isinstance(schema, list):
        return [_structure(v) for v in schema]
    return schema


def _fits(completion: Completion, schema: dict[str, Any]) -> bool:
    """Whether a reply the output type accepted can have come from a server that applied the
    schema: constrained decoding writes one bare object of the schema's structure, so JSON
    wrapped in prose or a fence that breaks that structure was written with it ignored."""
    text = completion.text.strip()
    if completion.finish_reason in ("length", LOOPED) or (
        text.startswith("{") and text.endswith("}")
    ):
        return True
    try:
        data = extract_json(text)
    except ValueError:
        return True  # not JSON at all: the output type's own check says so
    # Imported here: only a reply like this one needs it, and it takes ~50 ms to import.
    from jsonschema import Draft202012Validator

    return bool(Draft202012Validator(_structure(schema)).is_valid(data))


def _validate(completion: Completion, output_type: type[T]) -> tuple[T | str, bool]:
    """The validated value, or the error message to show the model; and whether a reply not
    cut off breaks what the JSON schema itself says (no JSON, wrong types, missing or unknown
    keys: not only the model's own validators)."""
    if completion.finish_reason == "length":
        return _CUT_OFF, False
    if completion.finish_reason == LOOPED:
        return _LOOPED, False
    if "{" not in completion.text:
        return _NO_JSON, True
    try:
        data = extract_json(completion.text)
    except ValueError as exc:
        return f"not valid JSON: {exc}", True
    try:
        return output_type.model_validate(data), False
    except ValidationError as exc:
        broken = any(error["type"] not in _VALIDATOR_ERRORS for error in exc.errors())
        return exc.json(include_url=False, include_context=False)[:2000], broken


def schema_instruction(schema: dict[str, Any]) -> str:
    """Appended to the system message when the server cannot constrain output to a schema:
    the schema, then an example of each shape it allows (shown the schema alone, a small
    model copies it back)."""
    shapes = schema.get("anyOf") or [schema]
    examples = "\n".join(json.dumps(_example(shape)) for shape in shapes)
    return (
        "\n\nReply with one JSON object that validates against this JSON schema, "
        "and nothing else (no prose, no code fences):\n"
        + json.dumps(schema, separators=(",", ":"))
        + "\nDo not repeat the schema: fill it in. Objects of its shape"
        + (", one per line:" if len(shapes) > 1 else ":")
        + f"\n{examples}"
    )


def _example(schema: dict[str, Any]) -> Any:
    """A small instance of ``schema``: its required keys, first choices, minimal values."""
    if "anyOf" in schema:
        return _example(schema["anyOf"][0])
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        required = schema.get("required") or list(schema.get("properties") or {})
        return {key: _example(schema["properties"][key]) for key in required}
    if kind == "array":
        items = schema.get("items") or {}
        if "enum" in items:
            return list(items["enum"][:2])
        return [_example(items)]
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 0))
    return True if kind == "boolean" else "..."


def repair_message(error: str) -> Message:
    """The re-ask after an invalid structured answer: the model sees its own error."""
    content = f"Your reply was not valid. Error:\n{error}\n"
    return {"role": "user", "content": content + "Reply again with one corrected JSON object only."}
