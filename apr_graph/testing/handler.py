"""The HTTP side of ``ScriptedServer``: one handler per connection, speaking HTTP/1.1.

The handler reads a request, records it, asks the server which reply the script gives, and
writes that reply with ``wire``: a JSON body, an SSE stream, or an error.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from apr_graph.testing import wire
from apr_graph.testing.script import Pacer, RecordedRequest, Reply

if TYPE_CHECKING:
    from apr_graph.testing.server import ScriptedServer

__all__ = ["LoopbackHTTPServer", "ScriptedHandler"]


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that answers for one ``ScriptedServer``."""

    request_queue_size = 1024  # a fan-out opens many connections at once
    daemon_threads = True

    def __init__(self, scripted: ScriptedServer) -> None:
        self.scripted = scripted
        super().__init__(("127.0.0.1", 0), ScriptedHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-reply (cancellation, timeouts) are expected here.
        return


class ScriptedHandler(BaseHTTPRequestHandler):
    """Answers one connection's requests from the server's script."""

    protocol_version = "HTTP/1.1"
    server: LoopbackHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # keep test output quiet

    # -- GET ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        """Answer a GET: the model list, an extra route, or 404."""
        request = self._record("GET", None)
        status, payload = self._get(self.path)
        request.status = status
        if isinstance(payload, str):
            self._send_raw(status, payload.encode(), "text/plain")
        else:
            self._send_json(status, payload)
        request.ended_at = time.monotonic()

    def _get(self, path: str) -> tuple[int, Any]:
        scripted = self.server.scripted
        if not self._authorised():
            return 401, wire.error_body(401, "Incorrect API key provided.")
        if path in scripted.routes:
            return 200, scripted.routes[path]
        if path.rstrip("/").endswith("/models"):
            data = [{"id": m, "object": "model", "owned_by": "apr-test"} for m in scripted.models]
            return 200, {"object": "list", "data": data}
        return 404, wire.error_body(404, f"no route {path}")

    # -- POST -----------------------------------------------------------------------------
    def do_POST(self) -> None:
        """Answer a POST: a chat or text completion, or a refusal."""
        request = self._record("POST", self._read_body())
        try:
            self._post(request)
        except (BrokenPipeError, ConnectionResetError):
            request.status = 499  # the client went away
        finally:
            request.ended_at = time.monotonic()

    def _post(self, request: RecordedRequest) -> None:
        refusal = self._refusal(request)
        if refusal is not None:
            status, message = refusal
            request.status = status
            self._send_json(status, wire.error_body(status, message))
            return
        body = request.body or {}
        text = self._is_text_completion()
        reply = self.server.scripted.pick(request)
        if text:
            reply = wire.apply_stop(reply, body.get("stop"))
        if reply.delay_s:
            time.sleep(reply.delay_s)
        request.status = reply.status
        self._send_reply(request, reply, text)

    def _refusal(self, request: RecordedRequest) -> tuple[int, str] | None:
        """Why the server refuses ``request`` before any rule sees it, if it does."""
        scripted = self.server.scripted
        path = self.path.rstrip("/")
        if not (path.endswith("/chat/completions") or self._is_text_completion()):
            return 404, f"no route {self.path}"
        if not self._authorised():
            return 401, "Incorrect API key provided."
        if request.body is None:
            return 400, "request body is not a JSON object"
        model = request.body.get("model")
        if scripted.strict_models and model not in scripted.models:
            return 404, f"The model `{model}` does not exist."
        response_format = request.body.get("response_format")
        if isinstance(response_format, dict) and scripted.response_formats is not None:
            kind = response_format.get("type")
            if kind not in scripted.response_formats:
                status = scripted.response_format_status
                return status, f"response_format type {kind!r} is not supported"
        return None

    def _send_reply(self, request: RecordedRequest, reply: Reply, text: bool) -> None:
        scripted = self.server.scripted
        if reply.body is not None:
            raw = reply.body.encode() if isinstance(reply.body, str) else reply.body
            kind = "text/html" if raw.lstrip().startswith(b"<") else "application/json"
            self._send_raw(reply.status, raw, kind, reply.headers)
        elif reply.status >= 400:
            body = wire.error_body(reply.status, reply.error_message)
            self._send_json(reply.status, body, reply.headers)
        elif (request.body or {}).get("stream"):
            with scripted.pace(request, reply) as pacer:
                self._stream(request, reply, pacer, text)
        else:
            with scripted.pace(request, reply) as pacer:
                pacer.wait(len(reply.text().split()))
            payload = wire.completion(request, reply)
            if text:
                payload = wire.as_text_completion(payload)
            self._send_json(reply.status, payload, reply.headers)

    def _stream(self, request: RecordedRequest, reply: Reply, pacer: Pacer, text: bool) -> None:
        body = wire.completion(request, reply)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        base = wire.stream_base(body, text)
        for index, piece in enumerate(wire.stream_pieces(reply.text())):
            if reply.cut_stream_after is not None and index >= reply.cut_stream_after:
                self.close_connection = True
                self.wfile.flush()
                return  # no finish_reason, no [DONE], no final empty chunk
            if reply.chunk_delay_s:
                time.sleep(reply.chunk_delay_s)
            pacer.wait(index + 1)
            self._send_chunk(wire.sse_event(wire.delta_chunk(base, piece, text)))
        self._send_chunk(wire.sse_event(wire.end_chunk(base, reply, text)))
        options = (request.body or {}).get("stream_options") or {}
        if options.get("include_usage"):
            self._send_chunk(wire.sse_event(wire.usage_chunk(base, body["usage"])))
        self._send_chunk(wire.SSE_DONE)
        self._send_chunk(b"")

    # -- plumbing -------------------------------------------------------------------------
    def _record(self, method: str, body: dict[str, Any] | None) -> RecordedRequest:
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = RecordedRequest(method, self.path, headers, body, time.monotonic())
        self.server.scripted.record(request)
        return request

    def _is_text_completion(self) -> bool:
        return self.path.rstrip("/").endswith("/v1/completions")

    def _authorised(self) -> bool:
        api_key = self.server.scripted.api_key
        return api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}"

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

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_raw(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(wire.http_chunk(data))
        self.wfile.flush()
