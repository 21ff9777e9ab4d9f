"""``transformers serve`` (5.x) as a personality of the scripted server.

Checked against ``transformers serve`` 5.25.0 (issue 34, CPU, with and without
``--continuous-batching``):

- streams end without ``data: [DONE]``: the last event is the usage chunk (or the finish);
- ``stream_options.include_usage`` is honoured: the usage comes in a chunk of its own;
- ``response_format`` is dropped (the log says ``Ignoring unsupported fields``), so the model
  answers in prose, or in fenced JSON that follows no schema;
- ``/v1/models`` entries are ``{"id", "object": "model", "owned_by": "local", "created": 0,
  "status": {...}}``; a reply's ``model`` is the name as requested, without ``@main``;
- ``/props``, ``/slots`` and ``/metrics`` are FastAPI's 404 ``{"detail": "Not Found"}``;
  ``/health`` answers; there is no API key.

From huggingface/transformers (https://github.com/huggingface/transformers),
``src/transformers/cli/serving``, and not contradicted by 5.25.0:

- ``utils.py`` ``BaseHandler._validate_request``: keys OpenAI's
  ``CompletionCreateParamsStreaming`` lacks are a 422 "Unexpected fields in the request:
  {...}";
- ``utils.py`` ``BaseHandler._resolve_model``: with ``--force-model`` another model name is a
  400 "Server is pinned to 'X'; requested 'Y'."; without it the name is loaded from the Hub,
  and a name it cannot load fails as FastAPI's plain-text 500 "Internal Server Error".
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apr_graph.testing import wire
from apr_graph.testing.personalities.base import Personality, Route
from apr_graph.testing.script import RecordedRequest, Reply
from apr_graph.testing.wire import Answer

if TYPE_CHECKING:
    from apr_graph.testing.server import ScriptedServer

__all__ = ["TransformersServe"]


@functools.cache
def _known_keys() -> frozenset[str]:
    # Imported on first use: the SDK's types take a second to import, and a test double
    # started as its own process should start fast.
    from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming

    params = CompletionCreateParamsStreaming
    return frozenset(params.__required_keys__ | params.__optional_keys__) | {
        "generation_config",
        "seed",
    }


@dataclass
class TransformersServe(Personality):
    """``transformers serve``: one Hub model, ``response_format`` ignored, FastAPI errors,
    streams without ``[DONE]``.

    The served model is the server's first model name, a Hub path such as
    ``Qwen/Qwen2.5-1.5B-Instruct``. There is no API key.

    Args:
        force_model: started with ``--force-model``: another model name is a 400; without
            it, a name the server cannot load is a plain-text 500.

    Example:
        >>> from apr_graph.testing import Reply, Rule, ScriptedServer, TransformersServe
        >>> rules, hub = [Rule(reply=Reply(content="prose"))], ["Qwen/Qwen2.5-1.5B-Instruct"]
        >>> server = ScriptedServer(rules, models=hub, personality=TransformersServe())
    """

    force_model: bool = True

    def error(self, status: int, message: str | None) -> Answer:
        """FastAPI's ``HTTPException`` body."""
        return Answer(status, {"detail": message})

    def not_found(self, path: str) -> Answer:
        """FastAPI's answer to a path without a route."""
        return Answer(404, {"detail": "Not Found"})

    def serves(self, path: str) -> bool:
        """FastAPI routes under ``/v1`` only: ``/chat/completions`` without it is a 404."""
        return path.startswith("/v1/")

    def authorise(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """``transformers serve`` takes no API key: every request is let in."""
        return None

    def routes(self, server: ScriptedServer) -> dict[str, Route]:
        """``/health``."""
        return {"/health": {"status": "ok"}}

    def models(self, server: ScriptedServer) -> Any:
        """The served models; ``status`` as the server has it (apr reads only ``id``)."""
        data = [
            {
                "id": m,
                "object": "model",
                "owned_by": "local",
                "created": 0,
                "status": {"value": "loaded"},
            }
            for m in server.models
        ]
        return {"object": "list", "data": data}

    def admit(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """Unknown keys are a 422; the model must be the served one; ``response_format``
        and the other unsupported fields pass (and are ignored)."""
        body = request.body or {}
        chat = request.path.rstrip("/").endswith("/chat/completions")
        unexpected = set(body) - _known_keys()
        if chat and unexpected:
            return self.error(422, f"Unexpected fields in the request: {unexpected}")
        served, requested = server.models[0], body.get("model")
        if self.force_model:
            if requested is None or requested == served:
                return None
            return self.error(400, f"Server is pinned to '{served}'; requested '{requested}'.")
        if isinstance(requested, str) and _canonical(requested) == _canonical(served):
            return None
        return Answer(500, "Internal Server Error", "text/plain; charset=utf-8")

    def decorate(self, server: ScriptedServer, request: RecordedRequest, reply: Reply) -> Reply:
        """Replies name the model as requested (5.25.0: no ``@main`` revision suffix)."""
        extra = {"model": (request.body or {}).get("model") or server.models[0], **reply.extra}
        return dataclasses.replace(reply, extra=extra)

    def stream_end(
        self,
        request: RecordedRequest,
        base: dict[str, Any],
        reply: Reply,
        counts: dict[str, Any],
        text: bool,
    ) -> list[bytes]:
        """The finish and the usage chunk, then nothing: no ``data: [DONE]`` (5.25.0)."""
        return wire.stream_end(request, base, reply, counts, text, done=False)


def _canonical(model: str) -> str:
    """``process_model_name``: a model id with its revision, ``@main`` by default (the
    server still resolves names this way, though its replies no longer show it)."""
    return model if "@" in model else f"{model}@main"
