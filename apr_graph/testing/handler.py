"""The HTTP side of ``ScriptedServer``: one handler per connection, speaking HTTP/1.1.

The handler reads a request, records it, asks the server which reply the script gives, and
writes that reply with ``wire``: a JSON body, an SSE stream, or an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from apr_graph.testing import wire
from apr_graph.testing.script import Pacer, RecordedRequest, Reply
from apr_graph.testing.wire import Answer

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

    @functools.cached_property
    def open(self) -> set[socket.socket]:
        """The connections being served, kept alive or not."""
        return set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.open.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening and drop every open connection, as a server process that dies
        does: a client's next request on a kept-alive connection fails, and so does a new
        one."""
        super().server_close()
        for connection in list(self.open):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class ScriptedHandler(BaseHTTPRequestHandler):
    """Answers one connection's requests from the server's script."""

    protocol_version = "HTTP/1.1"
    server: LoopbackHTTPServer
    disable_nagle_algorithm = True
    """TCP_NODELAY, as asyncio servers (uvicorn: vLLM, LiteLLM, llama-cpp-python) set it:
    otherwise the second write of every reply waits for the client's delayed ACK (40 ms a
    request) and streamed chunks arrive in bursts."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # keep test output quiet

    # -- GET ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        """Answer a GET: the model list, an extra route, or the server's 404."""
        request = self._record("GET", None)
        scripted = self.server.scripted
        persona = scripted.personality
        answer = (
            persona.authorise(scripted, request)
            or persona.get(scripted, request.path)
            or persona.not_found(request.path)
        )
        request.status = answer.status
        self._send_answer(answer)
        request.ended_at = time.monotonic()

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
        scripted = self.server.scripted
        refusal = self._refusal(request)
        if refusal is not None:
            request.status = refusal.status
            self._send_answer(refusal)
            return
        text = self._is_text_completion()
        reply = scripted.pick(request)
        if text:
            reply = wire.apply_stop(reply, (request.body or {}).get("stop"))
        if reply.status < 400 and reply.body is None:
            reply = scripted.personality.decorate(scripted, request, reply)
        if reply.delay_s:
            time.sleep(reply.delay_s)
        request.status = reply.status
        self._send_reply(request, reply, text)

    def _refusal(self, request: RecordedRequest) -> Answer | None:
        """The server's refusal of ``request`` before any rule sees it, if it refuses."""
        scripted = self.server.scripted
        persona = scripted.personality
        path = self.path.rstrip("/")
        completion = path.endswith("/chat/completions") or self._is_text_completion()
        if not completion or not persona.serves(path):
            return persona.not_found(self.path)
        refusal = persona.authorise(scripted, request)
        if refusal is None and request.body is None:
            refusal = persona.error(400, "request body is not a JSON object")
        return refusal or persona.admit(scripted, request)

    def _send_reply(self, request: RecordedRequest, reply: Reply, text: bool) -> None:
        scripted = self.server.scripted
        if reply.body is not None:
            raw = reply.body.encode() if isinstance(reply.body, str) else reply.body
            kind = "text/html" if raw.lstrip().startswith(b"<") else "application/json"
            self._send_raw(reply.status, raw, kind, reply.headers)
        elif reply.status >= 400:
            error = scripted.personality.error(reply.status, reply.error_message)
            headers = {**error.headers, **reply.headers}
            self._send_answer(dataclasses.replace(error, headers=headers))
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
        # Unpaced, the chunks go out in batches: the same bytes, a write per 64 chunks instead
        # of one each (a replayed 6,000-word trace took 0.4 s of writes per request).
        batch = 1 if reply.chunk_delay_s or type(pacer) is not Pacer else 64
        pending: list[bytes] = []
        for index, piece in enumerate(wire.stream_pieces(reply.text())):
            if reply.cut_stream_after is not None and index >= reply.cut_stream_after:
                self.close_connection = True
                self._send_chunks(pending)
                return  # no finish_reason, no [DONE], no final empty chunk
            if reply.chunk_delay_s:
                time.sleep(reply.chunk_delay_s)
            pacer.wait(index + 1)
            pending.append(wire.sse_event(wire.delta_chunk(base, piece, text)))
            if len(pending) >= batch:
                self._send_chunks(pending)
                request.streamed += len(pending)
                pending = []
        self._send_chunks(pending)
        request.streamed += len(pending)
        persona = self.server.scripted.personality
        ending = persona.stream_end(request, base, reply, body["usage"], text)
        for event in ending:
            self._send_chunk(event)
        self._send_chunk(b"")

    # -- plumbing -------------------------------------------------------------------------
    def _record(self, method: str, body: dict[str, Any] | None) -> RecordedRequest:
        headers = {k.lower(): v for k, v in self.headers.items()}
        peer = (str(self.client_address[0]), int(self.client_address[1]))
        request = RecordedRequest(method, self.path, headers, body, time.monotonic(), peer=peer)
        self.server.scripted.record(request)
        return request

    def _is_text_completion(self) -> bool:
        return self.path.rstrip("/").endswith("/v1/completions")

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

    def _send_answer(self, answer: Answer) -> None:
        data, content_type = answer.encode()
        self._send_raw(answer.status, data, content_type, answer.headers)

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

    def _send_chunks(self, events: list[bytes]) -> None:
        """Send ``events`` as one write, each its own HTTP chunk."""
        if events:
            self.wfile.write(b"".join(wire.http_chunk(data) for data in events))
            self.wfile.flush()
