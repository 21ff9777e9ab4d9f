"""The LiteLLM proxy, run without a database, as a personality of the scripted server.

Reproduced from BerriAI/litellm (https://github.com/BerriAI/litellm), ``litellm/proxy``:

- ``auth/user_api_key_auth.py``: with a master key and no database, a key that is not the
  master key cannot be looked up and is refused with ``ProxyException(message="No connected
  db.", type=no_db_connection, code=400, param=None)``; no key at all is a 401 "Authentication
  Error, No api key passed in."; older releases (2024, issue #4880) wrapped the first case as a
  401 "Authentication Error, No connected db." of type ``auth_error``;
- ``_types.py`` ``ProxyException``: ``{"error": {"message", "type", "param", "code"}}`` with
  ``code`` a string (so OpenAI's SDK reads it);
- ``proxy_server.py``: ``/v1/models`` in the OpenAI shape, ``/health/liveliness`` public;
  FastAPI answers ``{"detail": "Not Found"}`` to paths it lacks (``/props``, ``/slots``,
  ``/metrics`` without the Prometheus callback).

A wildcard ``model_list`` entry forwards any model name to the one backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apr_graph.testing.personalities.base import Personality, Route
from apr_graph.testing.script import RecordedRequest
from apr_graph.testing.wire import Answer

if TYPE_CHECKING:
    from apr_graph.testing.server import ScriptedServer

__all__ = ["LiteLLMProxy"]

_TYPES = {400: "invalid_request_error", 401: "auth_error", 404: "not_found_error"}


@dataclass
class LiteLLMProxy(Personality):
    """A LiteLLM proxy without a database: the master key is the server's ``api_key``.

    Any model name is forwarded; ``/v1/models`` lists the server's models.

    Args:
        legacy_auth_errors: answer a wrong key the way 2024 releases did (401 "Authentication
            Error, No connected db.") instead of today's 400 "No connected db.".

    Example:
        >>> from apr_graph.testing import LiteLLMProxy, Reply, Rule, ScriptedServer
        >>> rules = [Rule(reply=Reply(content="hi"))]
        >>> server = ScriptedServer(rules, api_key="sk-master", personality=LiteLLMProxy())
    """

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
        """The configured model names, as OpenAI lists models."""
        data = [
            {"id": m, "object": "model", "created": 1677610602, "owned_by": "openai"}
            for m in server.models
        ]
        return {"data": data, "object": "list"}

    def admit(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """Every model name is forwarded to the one backend."""
        return None

    def authorise(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """The master key passes; without a database no other key can be checked."""
        if server.api_key is None or request.path.startswith("/health/liveliness"):
            return None
        if request.method == "GET" and self.get(server, request.path) is None:
            return None  # no route: FastAPI's 404 comes before authentication
        header = request.headers.get("authorization")
        if not header:
            return _auth_error(401, "Authentication Error, No api key passed in.")
        if not header.startswith("Bearer "):
            message = "Malformed API Key passed in. Ensure Key has `Bearer ` prefix."
            return _auth_error(401, f"Authentication Error, {message}")
        if header == f"Bearer {server.api_key}":
            return None
        if self.legacy_auth_errors:
            return _auth_error(401, "Authentication Error, No connected db.")
        body = {"message": "No connected db.", "type": "no_db_connection", "param": None}
        return Answer(400, {"error": {**body, "code": "400"}})


def _auth_error(status: int, message: str) -> Answer:
    """An authentication ``ProxyException``: its ``param`` is the string ``"None"``."""
    body = {"message": message, "type": "auth_error", "param": "None", "code": str(status)}
    return Answer(status, {"error": body})
