"""A scripted OpenAI-compatible HTTP server on loopback, for tests without a model.

It speaks the real protocol (``/v1/chat/completions``, ``/v1/models``, SSE streaming), so
tests drive the real SDK and HTTP stack. Rules decide each reply; faults (status codes,
``Retry-After``, broken bodies, delays) are part of a reply.

Example:
    >>> from apr_graph.testing import Reply, Rule, ScriptedServer
    >>> with ScriptedServer([Rule(reply=Reply(content="4"))]) as server:
    ...     url = server.base_url  # point AprSettings(base_url=url) here
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["RecordedRequest", "Reply", "Rule", "ScriptedServer"]


@dataclass
class Reply:
    """What the server answers to one request.

    Attributes:
        content: message text; a dict or list is sent as its JSON text.
        status: HTTP status. Non-2xx statuses send an OpenAI-style error body.
        error_message: the error text of a non-2xx reply.
        headers: extra response headers (e.g. ``{"Retry-After": "1"}``).
        delay_s: seconds to wait before answering (per request: concurrent requests overlap).
        finish_reason: ``stop``, ``length``, ...
        body: raw body sent instead of a completion (HTML, broken JSON...).
        empty_choices: answer with ``"choices": []``.
        usage: override of the usage object; by default tokens are counted as words.
        extra: extra top-level fields of the completion (e.g. llama.cpp ``timings``).
        chunk_delay_s: when streamed, the pause before each chunk (a decode step); a client
            that hangs up is noticed at the next chunk and recorded with status 499.
        cut_stream_after: when streamed, close the connection after this many content chunks,
            without a finish_reason (a stream cut mid-way).
        tool_calls: tool calls the assistant makes, as ``{"name": ..., "arguments": {...}}``
            (non-streamed replies); ``finish_reason`` becomes ``tool_calls``.
    """

    content: str | dict[str, Any] | list[Any] | None = None
    status: int = 200
    error_message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    finish_reason: str = "stop"
    body: str | bytes | None = None
    empty_choices: bool = False
    usage: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    chunk_delay_s: float = 0.0
    cut_stream_after: int | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message content as sent."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return json.dumps(self.content)


class Pacer:
    """Releases a reply's tokens; this base releases them at once (no model latency)."""

    def wait(self, tokens: int) -> None:
        """Block until ``tokens`` output tokens exist."""

    def __enter__(self) -> Pacer:
        return self

    def __exit__(self, *exc: object) -> None:
        """The reply is over (finished, or the client hung up)."""


@dataclass
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    started_at: float
    ended_at: float | None = None
    status: int | None = None

    @property
    def role(self) -> str | None:
        """The apr-graph role of the call (``X-Apr-Role`` header), if any."""
        return self.headers.get("x-apr-role")

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The chat messages of the request."""
        if not self.body:
            return []
        return list(self.body.get("messages") or [])

    @property
    def last_user_message(self) -> str:
        """Text of the last user message (for ``/completions``: the prompt)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _text_of(message.get("content"))
        return self.prompt

    @property
    def prompt(self) -> str:
        """The prompt of a ``/completions`` request."""
        prompt = (self.body or {}).get("prompt")
        return prompt if isinstance(prompt, str) else ""

    @property
    def all_text(self) -> str:
        """All message texts joined (or the prompt), for matching."""
        return "\n".join(_text_of(m.get("content")) for m in self.messages) or self.prompt


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


ReplyFactory = Callable[[RecordedRequest], Reply]


@dataclass
class Rule:
    """Which requests get which reply. The first rule that matches and has uses left answers.

    Attributes:
        reply: a ``Reply``, or a function of the request returning one.
        role: match the ``X-Apr-Role`` header (``planner``, ``worker``, ``synthesizer``).
        contains: match a substring of the last user message.
        pattern: match a regular expression anywhere in the messages.
        where: any other predicate on the request.
        times: how many requests this rule answers; ``None`` for unlimited.
    """

    reply: Reply | ReplyFactory
    role: str | None = None
    contains: str | None = None
    pattern: str | None = None
    where: Callable[[RecordedRequest], bool] | None = None
    times: int | None = None
    hits: int = 0

    def matches(self, request: RecordedRequest) -> bool:
        """Whether this rule answers ``request``."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.role is not None and request.role != self.role:
            return False
        if self.contains is not None and self.contains not in request.last_user_message:
            return False
        if self.pattern is not None and not re.search(self.pattern, request.all_text, re.S):
            return False
        return self.where is None or self.where(request)

    def answer(self, request: RecordedRequest) -> Reply:
        """The reply for ``request``."""
        return self.reply(request) if callable(self.reply) else self.reply


class ScriptedServer:
    """An OpenAI-compatible server on ``127.0.0.1`` answering by rules.

    Args:
        rules: tried in order for every chat completion request.
        models: names listed by ``/v1/models``; with ``strict_models`` other names get 404.
        response_formats: the ``response_format`` types accepted; others get a 400, the way
            servers that lack a mode answer. Default: all.
        response_format_status: the status of that refusal: 400 like vLLM, or 500 like
            llama-cpp-python's server.
        api_key: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
        routes: extra GET routes by exact path (e.g. ``{"/props": {"total_slots": 4}}``); a
            dict is sent as JSON, a string as text (e.g. Prometheus ``/metrics``).
    """

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        models: Iterable[str] = ("test-model",),
        strict_models: bool = False,
        response_formats: Iterable[str] | None = None,
        response_format_status: int = 400,
        api_key: str | None = None,
        routes: dict[str, Any] | None = None,
    ) -> None:
        self.routes: dict[str, Any] = dict(routes or {})
        self.response_format_status = response_format_status
        self.rules: list[Rule] = list(rules)
        self.models = list(models)
        self.strict_models = strict_models
        self.response_formats = None if response_formats is None else set(response_formats)
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ScriptedServer:
        """Start serving on a free loopback port."""
        handler = _make_handler(self)
        self._httpd = _QuietHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The ``/v1`` URL to give a client."""
        if self._httpd is None:
            raise RuntimeError("ScriptedServer is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    # -- inspection --------------------------------------------------------------------------
    def chat_requests(self, role: str | None = None) -> list[RecordedRequest]:
        """Chat completion requests received, optionally only those of one role."""
        with self._lock:
            found = [r for r in self.requests if r.path.endswith("/chat/completions")]
        return [r for r in found if role is None or r.role == role]

    # -- pacing --------------------------------------------------------------------------
    def pace(self, request: RecordedRequest, reply: Reply) -> Pacer:
        """How the reply's tokens are released; subclasses model a real server's timing."""
        return Pacer()

    # -- request handling ---------------------------------------------------------------
    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _pick(self, request: RecordedRequest) -> Reply:
        with self._lock:
            for rule in self.rules:
                if rule.matches(request):
                    rule.hits += 1
                    break
            else:
                return Reply(
                    status=400,
                    error_message="ScriptedServer: no rule matched this request; "
                    f"last user message: {request.last_user_message[:200]!r}",
                )
        return rule.answer(request)


class _QuietHTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024  # a fan-out opens many connections at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-reply (cancellation, timeouts) are expected here.
        return


def _usage(request: RecordedRequest, text: str) -> dict[str, Any]:
    prompt = len(request.all_text.split())
    completion = len(text.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion(request: RecordedRequest, reply: Reply) -> dict[str, Any]:
    text = reply.text()
    model = (request.body or {}).get("model", "test-model")
    choices = (
        []
        if reply.empty_choices
        else [
            {
                "index": 0,
                "message": _message(text, reply.tool_calls),
                "finish_reason": "tool_calls" if reply.tool_calls else reply.finish_reason,
            }
        ]
    )
    payload: dict[str, Any] = {
        "id": f"chatcmpl-{int(time.time() * 1e6)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": reply.usage if reply.usage is not None else _usage(request, text),
    }
    payload.update(reply.extra)
    return payload


def _apply_stop(reply: Reply, stop: Any) -> Reply:
    """Cut a completion at its first stop string, as servers do (and say which, like vLLM)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    text = reply.text()
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if reply.status >= 400 or not hits:
        return reply
    cut, which = min(hits)
    return Reply(**{**reply.__dict__, "content": text[:cut], "finish_reason": "stop",
                    "extra": {**reply.extra, "stop_reason": which}})  # fmt: skip


def _as_text_completion(payload: dict[str, Any]) -> dict[str, Any]:
    choices = []
    for choice in payload["choices"]:
        entry = {"index": 0, "text": choice["message"]["content"],
                 "finish_reason": choice["finish_reason"], "logprobs": None}  # fmt: skip
        if payload.get("stop_reason"):
            entry["stop_reason"] = payload.pop("stop_reason")
        choices.append(entry)
    return {**payload, "object": "text_completion", "choices": choices}


def _message(text: str, tool_calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}}
            for i, c in enumerate(tool_calls)
        ]  # fmt: skip
    return message


def _error_body(status: int, message: str | None) -> dict[str, Any]:
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


def _make_handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return  # keep test output quiet

        def _send_json(
            self, status: int, payload: Any, headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self._send_raw(status, data, "application/json", headers)

        def _send_raw(
            self,
            status: int,
            data: bytes,
            content_type: str,
            headers: dict[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> dict[str, Any] | None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not raw:
                return None
            try:
                parsed = json.loads(raw)
            except ValueError:
                return None
            return parsed if isinstance(parsed, dict) else None

        def _authorised(self) -> bool:
            if server.api_key is None:
                return True
            return self.headers.get("Authorization") == f"Bearer {server.api_key}"

        def do_GET(self) -> None:
            request = RecordedRequest(
                "GET",
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                None,
                time.monotonic(),
            )
            server._record(request)
            if not self._authorised():
                request.status = 401
                self._send_json(401, _error_body(401, "Incorrect API key provided."))
            elif self.path in server.routes:
                request.status = 200
                route = server.routes[self.path]
                if isinstance(route, str):
                    self._send_raw(200, route.encode(), "text/plain")
                else:
                    self._send_json(200, route)
            elif self.path.rstrip("/").endswith("/models"):
                request.status = 200
                data = [{"id": m, "object": "model", "owned_by": "apr-test"} for m in server.models]
                self._send_json(200, {"object": "list", "data": data})
            else:
                request.status = 404
                self._send_json(404, _error_body(404, f"no route {self.path}"))
            request.ended_at = time.monotonic()

        def do_POST(self) -> None:
            body = self._read_body()
            request = RecordedRequest(
                "POST",
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                body,
                time.monotonic(),
            )
            server._record(request)
            try:
                self._answer(request)
            except (BrokenPipeError, ConnectionResetError):
                request.status = 499  # the client went away
            finally:
                request.ended_at = time.monotonic()

        def _answer(self, request: RecordedRequest) -> None:
            text_completion = self.path.rstrip("/").endswith("/v1/completions")
            if not (self.path.rstrip("/").endswith("/chat/completions") or text_completion):
                request.status = 404
                self._send_json(404, _error_body(404, f"no route {self.path}"))
                return
            if not self._authorised():
                request.status = 401
                self._send_json(401, _error_body(401, "Incorrect API key provided."))
                return
            body = request.body or {}
            if request.body is None:
                request.status = 400
                self._send_json(400, _error_body(400, "request body is not a JSON object"))
                return
            model = body.get("model")
            if server.strict_models and model not in server.models:
                request.status = 404
                self._send_json(404, _error_body(404, f"The model `{model}` does not exist."))
                return
            rf = body.get("response_format")
            if (
                isinstance(rf, dict)
                and server.response_formats is not None
                and rf.get("type") not in server.response_formats
            ):
                status = server.response_format_status
                request.status = status
                self._send_json(
                    status,
                    _error_body(
                        status, f"response_format type {rf.get('type')!r} is not supported"
                    ),
                )
                return
            reply = server._pick(request)
            if text_completion:
                reply = _apply_stop(reply, body.get("stop"))
            if reply.delay_s:
                time.sleep(reply.delay_s)
            request.status = reply.status
            if reply.body is not None:
                raw = reply.body.encode() if isinstance(reply.body, str) else reply.body
                kind = "text/html" if raw.lstrip().startswith(b"<") else "application/json"
                self._send_raw(reply.status, raw, kind, reply.headers)
            elif reply.status >= 400:
                self._send_json(
                    reply.status, _error_body(reply.status, reply.error_message), reply.headers
                )
            elif body.get("stream"):
                with server.pace(request, reply) as pacer:
                    self._stream(request, reply, pacer, text_completion)
            else:
                with server.pace(request, reply) as pacer:
                    pacer.wait(len(reply.text().split()))
                payload = _completion(request, reply)
                if text_completion:
                    payload = _as_text_completion(payload)
                self._send_json(reply.status, payload, reply.headers)

        def _stream(
            self, request: RecordedRequest, reply: Reply, pacer: Pacer, text: bool = False
        ) -> None:
            completion = _completion(request, reply)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.end_headers()
            base = {k: completion[k] for k in ("id", "created", "model")}
            base["object"] = "text_completion" if text else "chat.completion.chunk"
            # Every character is sent, leading spaces included: completions are exact text.
            words = re.findall(r"\s*\S+|\s+$", reply.text())
            for index, word in enumerate(words):
                if reply.cut_stream_after is not None and index >= reply.cut_stream_after:
                    self.close_connection = True
                    self.wfile.flush()
                    return  # no finish_reason, no [DONE], no final empty chunk
                if reply.chunk_delay_s:
                    time.sleep(reply.chunk_delay_s)
                pacer.wait(index + 1)
                delta: dict[str, Any] = (
                    {"index": 0, "text": word, "finish_reason": None}
                    if text
                    else {"index": 0, "delta": {"content": word}, "finish_reason": None}
                )
                self._event({**base, "choices": [delta]})
            end: dict[str, Any] = {"index": 0, "finish_reason": reply.finish_reason}
            if text:
                end["text"] = ""
            else:
                end["delta"] = {}
            if text and reply.extra.get("stop_reason"):
                end["stop_reason"] = reply.extra["stop_reason"]
            self._event({**base, "choices": [end]})
            options = (request.body or {}).get("stream_options") or {}
            if options.get("include_usage"):
                self._event({**base, "choices": [], "usage": completion["usage"]})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _event(self, payload: dict[str, Any]) -> None:
            self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler
