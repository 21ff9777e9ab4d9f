"""The OpenAI wire protocol as test servers write it: completion bodies, SSE chunks, errors.

Pure functions from a request and a ``Reply`` to JSON-shaped dicts or bytes, so the shapes
can be read (and tested) apart from the HTTP plumbing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from apr_graph.testing.script import RecordedRequest, Reply

__all__ = [
    "SSE_DONE",
    "Answer",
    "apply_stop",
    "as_text_completion",
    "completion",
    "delta_chunk",
    "end_chunk",
    "error_body",
    "http_chunk",
    "prompt_tokens",
    "sse_event",
    "stream_base",
    "stream_end",
    "stream_pieces",
    "tool_call_chunks",
    "usage",
    "usage_chunk",
]

SSE_DONE = b"data: [DONE]\n\n"
"""The last event of every OpenAI stream."""


@dataclass(frozen=True)
class Answer:
    """A whole HTTP answer other than a completion: an error, a refusal, a GET route.

    Attributes:
        status: the HTTP status.
        body: a JSON value, a text, or raw bytes.
        content_type: the ``Content-Type``; by default JSON, ``text/plain`` for a text.
        headers: extra response headers.
    """

    status: int
    body: Any
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> tuple[bytes, str]:
        """The body's bytes and content type."""
        if isinstance(self.body, bytes):
            return self.body, self.content_type or "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), self.content_type or "text/plain"
        return json.dumps(self.body).encode(), self.content_type or "application/json"


def prompt_tokens(request: RecordedRequest) -> int:
    """The prompt's length in tokens, counted as words."""
    return len(request.all_text.split())


def usage(request: RecordedRequest, text: str) -> dict[str, Any]:
    """Token counts of a reply, with tokens counted as words."""
    prompt = prompt_tokens(request)
    completion_tokens = len(text.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def completion(request: RecordedRequest, reply: Reply) -> dict[str, Any]:
    """The ``chat.completion`` body of a successful reply."""
    text = reply.text()
    model = (request.body or {}).get("model", "test-model")
    choices = (
        []
        if reply.empty_choices
        else [
            {
                "index": 0,
                "message": _message(text, reply.tool_calls),
                "finish_reason": _finish(reply),
            }
        ]
    )
    payload: dict[str, Any] = {
        "id": f"chatcmpl-{int(time.time() * 1e6)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": reply.usage if reply.usage is not None else usage(request, text),
    }
    payload.update(reply.extra)
    return payload


def apply_stop(reply: Reply, stop: Any) -> Reply:
    """Cut a completion at its first stop string, as servers do (and say which, like vLLM)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    text = reply.text()
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if reply.status >= 400 or not hits:
        return reply
    cut, which = min(hits)
    return dataclasses.replace(
        reply,
        content=text[:cut],
        finish_reason="stop",
        extra={**reply.extra, "stop_reason": which},
    )


def as_text_completion(payload: dict[str, Any]) -> dict[str, Any]:
    """Turn a ``chat.completion`` body into the ``text_completion`` shape of ``/completions``."""
    choices = []
    for choice in payload["choices"]:
        entry = {
            "index": 0,
            "text": choice["message"]["content"],
            "finish_reason": choice["finish_reason"],
            "logprobs": None,
        }
        if payload.get("stop_reason"):
            entry["stop_reason"] = payload.pop("stop_reason")
        choices.append(entry)
    return {**payload, "object": "text_completion", "choices": choices}


def _message(text: str, tool_calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": _arguments(call.get("arguments", {})),
                },
            }
            for i, call in enumerate(tool_calls)
        ]
    return message


def _arguments(arguments: Any) -> str:
    """A call's arguments as sent: an object as its JSON, a string as it is (a call whose
    arguments were cut off, or are not JSON)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _finish(reply: Reply) -> str:
    """``tool_calls`` for a reply that calls tools, unless it says otherwise (``length``)."""
    return (
        "tool_calls" if reply.tool_calls and reply.finish_reason == "stop" else reply.finish_reason
    )


def error_body(status: int, message: str | None) -> dict[str, Any]:
    """An OpenAI-style error body for ``status``."""
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }
    return {
        "error": {
            "message": message or f"scripted error {status}",
            "type": kinds.get(status, "server_error"),
            "code": status,
        }
    }


# -- streaming ---------------------------------------------------------------------------


def stream_pieces(text: str) -> list[str]:
    """The content chunks of a stream: one word each, leading spaces kept.

    Every character is sent, spaces included: completions are exact text.
    """
    return re.findall(r"\s*\S+|\s+$", text)


def stream_base(body: dict[str, Any], text: bool) -> dict[str, Any]:
    """The fields every chunk of a stream repeats, taken from the completion ``body``."""
    base = {key: body[key] for key in ("id", "created", "model")}
    base["object"] = "text_completion" if text else "chat.completion.chunk"
    return base


def delta_chunk(base: dict[str, Any], piece: str, text: bool) -> dict[str, Any]:
    """One content chunk of a stream."""
    choice: dict[str, Any] = (
        {"index": 0, "text": piece, "finish_reason": None}
        if text
        else {"index": 0, "delta": {"content": piece}, "finish_reason": None}
    )
    return {**base, "choices": [choice]}


ARGUMENT_PIECE_CHARS = 4
"""A streamed tool call's arguments arrive in pieces this long (about a token each)."""


def tool_call_chunks(base: dict[str, Any], reply: Reply) -> list[dict[str, Any]]:
    """The chunks that stream ``reply.tool_calls``, as OpenAI, vLLM and llama.cpp send them:
    one call after another, each opened by a delta with its ``index``, ``id``, ``type`` and
    ``function.name``, then its ``function.arguments`` in small pieces with the index only."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(_message("", reply.tool_calls).get("tool_calls", [])):
        arguments = call["function"]["arguments"]
        deltas.append(
            {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
        )
        deltas += [
            {"index": index, "function": {"arguments": arguments[at : at + ARGUMENT_PIECE_CHARS]}}
            for at in range(0, len(arguments), ARGUMENT_PIECE_CHARS)
        ]
    return [
        {
            **base,
            "choices": [{"index": 0, "delta": {"tool_calls": [d]}, "finish_reason": None}],
        }
        for d in deltas
    ]


def end_chunk(base: dict[str, Any], reply: Reply, text: bool) -> dict[str, Any]:
    """The chunk that carries the finish reason, and the reply's extra fields.

    The extra fields ride on this last chunk the way llama.cpp sends its ``timings``.
    """
    end: dict[str, Any] = {
        "index": 0,
        "finish_reason": reply.finish_reason if text else _finish(reply),
    }
    if text:
        end["text"] = ""
    else:
        end["delta"] = {}
    extra = dict(reply.extra)
    stop_reason = extra.pop("stop_reason", None)
    if text and stop_reason:
        end["stop_reason"] = stop_reason
    return {**base, **extra, "choices": [end]}


def usage_chunk(
    base: dict[str, Any], counts: dict[str, Any], choices: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The chunk sent after the end when ``stream_options.include_usage`` is set; OpenAI
    sends no ``choices`` (``[]``), some servers an empty delta."""
    return {**base, "choices": list(choices or []), "usage": counts}


def stream_end(
    request: RecordedRequest,
    base: dict[str, Any],
    reply: Reply,
    counts: dict[str, Any],
    text: bool,
    *,
    usage_choices: list[dict[str, Any]] | None = None,
    done: bool = True,
) -> list[bytes]:
    """The events that close a stream after its content: the tool calls (chat), the end
    chunk, the usage (``counts``, with ``usage_choices``) when
    ``stream_options.include_usage`` asks for it, and ``[DONE]`` unless ``done`` is off."""
    chunks = [] if text else tool_call_chunks(base, reply)
    chunks.append(end_chunk(base, reply, text))
    if ((request.body or {}).get("stream_options") or {}).get("include_usage"):
        chunks.append(usage_chunk(base, counts, usage_choices))
    events = [sse_event(chunk) for chunk in chunks]
    return [*events, SSE_DONE] if done else events


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload``."""
    return f"data: {json.dumps(payload)}\n\n".encode()


def http_chunk(data: bytes) -> bytes:
    """``data`` framed for ``Transfer-Encoding: chunked``; empty data ends the body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"
