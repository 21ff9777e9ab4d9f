"""What a server personality decides around the script: routes, models, auth, refusals, errors.

A ``ScriptedServer`` asks its personality before and after the rules: whether to refuse a
request (wrong key, unknown model, prompt too long), what extra GET routes exist, what an
error body looks like, and what the server adds to a reply (timings, cached tokens). This
base is the plain scripted server; the others reproduce real servers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from apr_graph.testing import wire
from apr_graph.testing.script import RecordedRequest, Reply
from apr_graph.testing.wire import Answer

if TYPE_CHECKING:
    from apr_graph.testing.server import ScriptedServer

__all__ = ["Personality", "Route", "as_answer"]

Route: TypeAlias = "Answer | dict[str, Any] | list[Any] | str | Callable[[ScriptedServer], Any]"
"""A GET route: an ``Answer``, a JSON value, a text, or a function of the server giving one."""


def as_answer(value: Any) -> Answer:
    """A route's value as a 200 answer: text for a string, JSON otherwise."""
    if isinstance(value, Answer):
        return value
    if isinstance(value, str):
        return Answer(200, value, "text/plain")
    return Answer(200, value)


class Personality:
    """A generic OpenAI-compatible server: OpenAI-style errors, all models, no extra routes.

    Subclasses reproduce one server family by overriding the policies below. A personality
    may keep state (a prompt cache, token counters), so give each server its own instance.
    """

    def error(self, status: int, message: str | None) -> Answer:
        """The server's error answer for ``status`` (scripted failures use it too)."""
        return Answer(status, wire.error_body(status, message))

    def not_found(self, path: str) -> Answer:
        """The answer to a path the server does not serve."""
        return self.error(404, f"no route {path}")

    def routes(self, server: ScriptedServer) -> dict[str, Route]:
        """GET routes the server family has, by exact path (the server's own routes win)."""
        return {}

    def models(self, server: ScriptedServer) -> Any:
        """The body of ``GET /v1/models``."""
        data = [{"id": m, "object": "model", "owned_by": "apr-test"} for m in server.models]
        return {"object": "list", "data": data}

    def get(self, server: ScriptedServer, path: str) -> Answer | None:
        """The answer to ``GET path``, or ``None`` when the server has no such route."""
        route = server.routes.get(path)
        if route is None:
            route = self.routes(server).get(path)
        if route is not None:
            return as_answer(route(server) if callable(route) else route)
        if path.rstrip("/").endswith("/models") and self.serves(path):
            return Answer(200, self.models(server))
        return None

    def serves(self, path: str) -> bool:
        """Whether the server has its OpenAI routes (completions, models) at ``path``.

        This base, like llama.cpp and LiteLLM, serves them with or without ``/v1``.
        """
        return True

    def authorise(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """The refusal of a request without the server's key, or ``None`` to let it in."""
        key = server.api_key
        if key is None or request.headers.get("authorization") == f"Bearer {key}":
            return None
        return self.error(401, "Incorrect API key provided.")

    def admit(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """The refusal of a completion request before any rule sees it, or ``None``."""
        body = request.body or {}
        model = body.get("model")
        if server.strict_models and model not in server.models:
            return self.error(404, f"The model `{model}` does not exist.")
        return self.refuse_response_format(server, body)

    def refuse_response_format(self, server: ScriptedServer, body: dict[str, Any]) -> Answer | None:
        """The refusal of a ``response_format`` type the server was told not to accept."""
        response_format = body.get("response_format")
        if not isinstance(response_format, dict) or server.response_formats is None:
            return None
        kind = response_format.get("type")
        if kind in server.response_formats:
            return None
        status = server.response_format_status
        return self.error(status, f"response_format type {kind!r} is not supported")

    def stream_end(
        self,
        request: RecordedRequest,
        base: dict[str, Any],
        reply: Reply,
        counts: dict[str, Any],
        text: bool,
    ) -> list[bytes]:
        """The events that close a stream after its content (``wire.stream_end``)."""
        return wire.stream_end(request, base, reply, counts, text)

    def decorate(self, server: ScriptedServer, request: RecordedRequest, reply: Reply) -> Reply:
        """What the server adds to a successful scripted reply (usage details, timings)."""
        return reply
