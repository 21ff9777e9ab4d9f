"""The LiteLLM proxy, run without a database, as a personality of the scripted server.

Checked against LiteLLM proxy 1.108.7 (issue 34), in front of llama-server:

- it will not start without a master key unless ``LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_
  MASTER_KEY=true``; a server without ``api_key`` is a proxy started that way;
- with a master key, a request with no key, or one without ``Bearer ``, gets FastAPI's
  plain-text 500 "Internal Server Error" (not a 401); a wrong key gets a 400 of type
  ``auth_error`` (no database to look the key up in);
- a model name no ``model_list`` entry routes gets a 400 ``invalid_request_error``
  "/chat/completions: Invalid model name passed in model=...";
- a dead backend gets a 500 ``internal_server_error`` whose message runs over several lines,
  blank ones among them;
- the streamed usage chunk carries ``"choices": [{"index": 0, "delta": {}}]``, not ``[]``;
- a wildcard route (``model_name: "*"``) forwards any name, and ``/v1/models`` then lists the
  provider's whole catalogue (212 names for the one checked).

The bodies' shapes come from BerriAI/litellm (https://github.com/BerriAI/litellm),
``litellm/proxy/_types.py`` ``ProxyException``: ``{"error": {"message", "type", "param",
"code"}}`` with ``code`` a string; FastAPI answers ``{"detail": "Not Found"}`` to paths the
proxy lacks (``/props``, ``/slots``, ``/metrics`` without the Prometheus callback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apr_graph.testing import wire
from apr_graph.testing.personalities.base import Personality, Route
from apr_graph.testing.script import RecordedRequest, Reply
from apr_graph.testing.wire import Answer

if TYPE_CHECKING:
    from apr_graph.testing.server import ScriptedServer

__all__ = ["CATALOGUE", "LiteLLMProxy"]

_TYPES = {400: "invalid_request_error", 401: "auth_error", 404: "not_found_error"}

_FAMILIES = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5", "o3")
_VARIANTS = (
    "",
    "-2024-05-13",
    "-2024-08-06",
    "-2024-11-20",
    "-2025-04-14",
    "-audio-preview",
    "-realtime-preview",
    "-search-preview",
    "-transcribe",
    "-tts",
    "-batch",
    "-flex",
    "-priority",
    "-eu",
    "-us",
    "-codex",
    "-chat-latest",
    "-instruct",
    "-preview",
    "-deep-research",
    "-pro",
    "-mini-high",
    "-mini-low",
    "-ft",
    "-web",
    "-responses",
    "-vision",
    "-turbo",
    "-2025-08-07",
    "-2025-10-01",
    "-latest",
    "-low",
)
_NAMES = dict.fromkeys(f"{f}{v}" for f in _FAMILIES for v in _VARIANTS)
CATALOGUE: tuple[str, ...] = tuple(_NAMES)[:212]
"""What a wildcard route's ``/v1/models`` lists: a provider's catalogue, 212 names as on the
proxy checked. None of them is the backend's own model."""

_DEAD_BACKEND = (
    "litellm.InternalServerError: InternalServerError: OpenAIException - Connection error.. "
    "Received Model Group={model}\nAvailable Model Group Fallbacks=None\n\n\n"
    "LiteLLM Retried: 1 times, LiteLLM Max Retries: 2\n\n"
)
"""The shape 1.108.7 sent for a backend that refused connections (status, type, lines);
the words are LiteLLM's usual router error."""


@dataclass
class LiteLLMProxy(Personality):
    """A LiteLLM proxy without a database: the master key is the server's ``api_key``.

    The server's ``models`` are the ``model_list`` entries; another name is a 400, unless
    ``wildcard``.

    Args:
        wildcard: a ``model_name: "*"`` entry: any name is forwarded to the one backend,
            and ``/v1/models`` lists ``CATALOGUE`` after the server's models.
        backend_down: the backend behind the proxy is down: every completion is a 500.
        legacy_auth_errors: answer a wrong key the way 2024 releases did (401 "Authentication
            Error, No connected db.") instead of a 400.

    Example:
        >>> from apr_graph.testing import LiteLLMProxy, Reply, Rule, ScriptedServer
        >>> rules = [Rule(reply=Reply(content="hi"))]
        >>> server = ScriptedServer(rules, api_key="sk-master", personality=LiteLLMProxy())
    """

    wildcard: bool = False
    backend_down: bool = False
    legacy_auth_errors: bool = False

    def error(self, status: int, message: str | None) -> Answer:
        """A ``ProxyException`` body: the code is a string, ``param`` is null."""
        kind = _TYPES.get(status, "internal_server_error" if status >= 500 else None)
        body = {"message": message or "", "type": kind, "param": None, "code": str(status)}
        return Answer(status, {"error": body})

    def not_found(self, path: str) -> Answer:
        """FastAPI's answer to a path without a route."""
        return Answer(404, {"detail": "Not Found"})

    def routes(self, server: ScriptedServer) -> dict[str, Route]:
        """The public liveness probe."""
        return {"/health/liveliness": Answer(200, '"I\'m alive!"', "application/json")}

    def models(self, server: ScriptedServer) -> Any:
        """The configured model names (and a wildcard's catalogue), as OpenAI lists models."""
        names = [*server.models, *(CATALOGUE if self.wildcard else ())]
        data = [
            {"id": m, "object": "model", "created": 1677610602, "owned_by": "openai"} for m in names
        ]
        return {"data": data, "object": "list"}

    def admit(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """A name no entry routes is a 400; a dead backend is a 500."""
        model = str((request.body or {}).get("model", ""))
        if not self.wildcard and model not in server.models:
            route = "/completions" if request.path.endswith("/v1/completions") else ""
            route = route or "/chat/completions"
            return self.error(
                400,
                f"{route}: Invalid model name passed in model={model}. "
                "Call `/v1/models` to view available models for your key.",
            )
        if self.backend_down:
            return self.error(500, _DEAD_BACKEND.format(model=model))
        return None

    def authorise(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """The master key passes; without a database no other key can be checked."""
        if server.api_key is None or request.path.startswith("/health/liveliness"):
            return None
        if request.method == "GET" and self.get(server, request.path) is None:
            return None  # no route: FastAPI's 404 comes before authentication
        header = request.headers.get("authorization") or ""
        if not header.startswith("Bearer "):
            # 1.108.7: the missing key is an unhandled exception, not a ProxyException.
            return Answer(500, "Internal Server Error", "text/plain; charset=utf-8")
        if header == f"Bearer {server.api_key}":
            return None
        status = 401 if self.legacy_auth_errors else 400
        message = "Authentication Error, No connected db."
        body = {"message": message, "type": "auth_error", "param": "None", "code": str(status)}
        return Answer(status, {"error": body})

    def stream_end(
        self,
        request: RecordedRequest,
        base: dict[str, Any],
        reply: Reply,
        counts: dict[str, Any],
        text: bool,
    ) -> list[bytes]:
        """The usage chunk carries an empty delta for choice 0 (1.108.7), not ``[]``."""
        return wire.stream_end(
            request, base, reply, counts, text, usage_choices=[{"index": 0, "delta": {}}]
        )
