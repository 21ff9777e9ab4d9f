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

import threading
from collections.abc import Iterable
from typing import Any

from apr_graph.testing.handler import LoopbackHTTPServer
from apr_graph.testing.personalities.base import Personality
from apr_graph.testing.script import Pacer, RecordedRequest, Reply, Rule

__all__ = ["Pacer", "RecordedRequest", "Reply", "Rule", "ScriptedServer"]


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
            dict is sent as JSON, a string as text (e.g. Prometheus ``/metrics``), a
            function of the server is called per request.
        personality: the real server to imitate around the rules (``LlamaCpp``, ``VLLM``,
            ``LiteLLMProxy``, ``TransformersServe``): its routes, model policy, auth, refusals
            and error bodies. It reads ``models`` and ``api_key`` as the real server's model
            names and key; ``strict_models`` and ``response_formats`` are the policy of the
            default (generic) personality. Give each server its own personality instance.
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
        personality: Personality | None = None,
    ) -> None:
        self.routes: dict[str, Any] = dict(routes or {})
        self.response_format_status = response_format_status
        self.rules: list[Rule] = list(rules)
        self.models = list(models)
        self.strict_models = strict_models
        self.response_formats = None if response_formats is None else set(response_formats)
        self.api_key = api_key
        self.personality = personality or Personality()
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._httpd: LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ScriptedServer:
        """Start serving on a free loopback port."""
        self._httpd = LoopbackHTTPServer(self)
        # A short poll: stop() waits for the serving loop to look, so it stops promptly.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.005}, daemon=True
        )
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

    def in_flight(self) -> list[RecordedRequest]:
        """Completion requests received and not yet answered in full."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.ended_at is None]

    # -- pacing --------------------------------------------------------------------------
    def pace(self, request: RecordedRequest, reply: Reply) -> Pacer:
        """How the reply's tokens are released; subclasses model a real server's timing."""
        return Pacer()

    # -- the script --------------------------------------------------------------------------
    def record(self, request: RecordedRequest) -> None:
        """Keep ``request`` for inspection (the handler calls this for every request)."""
        with self._lock:
            self.requests.append(request)

    def pick(self, request: RecordedRequest) -> Reply:
        """The reply of the first rule that matches ``request``; a 400 when none does."""
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
