"""llama.cpp's ``llama-server`` as a personality of the scripted server.

Reproduced from ggml-org/llama.cpp (https://github.com/ggml-org/llama.cpp), ``tools/server``:

- ``server-common.cpp`` ``format_error_response``: ``{"error": {"code", "message", "type"}}``
  with the HTTP status taken from the type (``exceed_context_size_error`` is a 400);
- ``server-context.cpp``: a prompt of ``n_ctx`` tokens or more is refused with "request (%d
  tokens) exceeds the available context size (%d tokens), try increasing it", and
  ``server-task.cpp`` ``server_task_result_error::to_json`` adds ``n_prompt_tokens`` and
  ``n_ctx`` to that error; ``/props`` (``total_slots``, ``default_generation_settings.n_ctx``
  per slot), ``/slots`` (``server_slot::to_json``), ``/v1/models`` (the one loaded model by
  its alias, ``owned_by: llamacpp``);
- ``server-common.cpp`` ``oaicompat_chat_params_parse``: without ``--jinja``, ``tools`` throws
  "tools param requires --jinja flag", which the server answers as a 500 ``server_error``;
- ``server-task.cpp`` ``result_timings::to_json``: ``timings`` with ``cache_n`` in replies;
- ``server.cpp``: 404 "File Not Found", 401 "Invalid API Key" (``/health`` and ``/models``
  are public), ``/metrics`` a 501 "This server does not support metrics endpoint. Start it
  with `--metrics`" unless started with ``--metrics``.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from apr_graph.testing import wire
from apr_graph.testing.personalities.base import Personality, Route
from apr_graph.testing.personalities.prometheus import Family, c_double, exposition
from apr_graph.testing.script import RecordedRequest, Reply
from apr_graph.testing.wire import Answer

if TYPE_CHECKING:
    from apr_graph.testing.server import ScriptedServer

__all__ = ["LlamaCpp"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}
_PUBLIC = {"/health", "/v1/health", "/models", "/v1/models", "/api/tags"}
_PROMPT_MS_PER_TOKEN = 0.5
_PREDICTED_MS_PER_TOKEN = 20.0


@dataclass
class LlamaCpp(Personality):
    """``llama-server``: one loaded model under any name, per-slot context, slots and props.

    The loaded model's alias is the server's first model name; requests may name any model.
    Prompt tokens are counted as words, as in the scripted usage.

    Args:
        n_ctx: the context of one slot (``-c`` divided by ``-np``); a prompt of this many
            tokens or more is refused with llama.cpp's 400 ``exceed_context_size_error``.
        total_slots: parallel slots (``-np``), reported by ``/props`` and ``/slots``.
        jinja: started with ``--jinja``; without it a request with ``tools`` gets a 500.
        tool_streams: a build that streams tool calls; older builds (before spring 2025)
            refuse ``stream`` with ``tools``: 500 "Cannot use tools with stream".
        metrics: started with ``--metrics``; without it ``/metrics`` answers 501.
        model_path: the GGUF file ``/props`` reports.

    Example:
        >>> from apr_graph.testing import LlamaCpp, Reply, Rule, ScriptedServer
        >>> persona = LlamaCpp(n_ctx=2048, total_slots=4, jinja=False)
        >>> server = ScriptedServer([Rule(reply=Reply(content="hi"))], personality=persona)
    """

    n_ctx: int = 4096
    total_slots: int = 1
    jinja: bool = True
    tool_streams: bool = True
    metrics: bool = False
    model_path: str = "/models/model-q4_k_m.gguf"
    _slots: list[list[str]] = field(default_factory=list, init=False, repr=False)
    _counters: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def error(self, status: int, message: str | None) -> Answer:
        """``format_error_response``: code, message and a type named after the status."""
        kind = _TYPES.get(status, "server_error")
        return Answer(status, {"error": {"code": status, "message": message, "type": kind}})

    def not_found(self, path: str) -> Answer:
        """The error handler of unknown paths."""
        return self.error(404, "File Not Found")

    def authorise(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """``--api-key``: every path but the public ones needs the key."""
        if request.path in _PUBLIC or super().authorise(server, request) is None:
            return None
        return self.error(401, "Invalid API Key")

    def models(self, server: ScriptedServer) -> Any:
        """The loaded model, in both the Ollama and the OpenAI shape, as llama.cpp lists it."""
        alias = server.models[0]
        meta = {"n_ctx": self.n_ctx, "n_ctx_train": max(self.n_ctx, 32768), "vocab_type": 2}
        return {
            "models": [{"name": alias, "model": alias, "type": "model", "capabilities": []}],
            "object": "list",
            "data": [{"id": alias, "object": "model", "owned_by": "llamacpp", "meta": meta}],
        }

    def routes(self, server: ScriptedServer) -> dict[str, Route]:
        """``/health``, ``/props``, ``/slots`` and ``/metrics``."""
        return {
            "/health": {"status": "ok"},
            "/props": self._props,
            "/slots": self._slots_state,
            "/metrics": self._metrics,
        }

    def admit(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """No model check; ``tools`` need ``--jinja``; the prompt must fit one slot."""
        body = request.body or {}
        if not self.tool_streams and body.get("tools") and body.get("stream"):
            return self.error(500, "Cannot use tools with stream")
        if not self.jinja and body.get("tools"):
            return self.error(500, "tools param requires --jinja flag")
        if not self.jinja and body.get("tool_choice") is not None:
            return self.error(500, "Unsupported param: tool_choice")
        tokens = wire.prompt_tokens(request)
        if tokens < self.n_ctx:
            return None
        message = (
            f"request ({tokens} tokens) exceeds the available context size "
            f"({self.n_ctx} tokens), try increasing it"
        )
        error = {"code": 400, "message": message, "type": "exceed_context_size_error"}
        error.update(n_prompt_tokens=tokens, n_ctx=self.n_ctx)
        return Answer(400, {"error": error})

    def decorate(self, server: ScriptedServer, request: RecordedRequest, reply: Reply) -> Reply:
        """``timings``: prompt tokens taken from the slot cache (``cache_n``) and speeds."""
        prompt = request.all_text.split()
        cached = self._reuse_slot(prompt)
        predicted = len(reply.text().split())
        timings = _timings(cached, len(prompt) - cached, predicted)
        return dataclasses.replace(reply, extra={"timings": timings, **reply.extra})

    def _reuse_slot(self, prompt: list[str]) -> int:
        """Cached tokens: the longest prefix a slot shares; that slot then holds ``prompt``."""
        with self._lock:
            while len(self._slots) < self.total_slots:
                self._slots.append([])
            shared = [_common_prefix(slot, prompt) for slot in self._slots]
            best = max(range(len(shared)), key=shared.__getitem__)
            self._slots[best] = prompt
            self._counters["prompt"] = self._counters.get("prompt", 0) + len(prompt)
            # At least one token is evaluated again, so the logits of the last one exist.
            return min(shared[best], max(len(prompt) - 1, 0))

    def _props(self, server: ScriptedServer) -> dict[str, Any]:
        settings = {"n_ctx": self.n_ctx, "params": {"n_predict": -1, "temperature": 0.8}}
        return {
            "default_generation_settings": settings,
            "total_slots": self.total_slots,
            "model_alias": server.models[0],
            "model_path": self.model_path,
            "modalities": {"vision": False, "audio": False},
            "endpoint_slots": True,
            "endpoint_props": False,
            "endpoint_metrics": self.metrics,
            "build_info": "b6000-scripted",
        }

    def _slots_state(self, server: ScriptedServer) -> list[dict[str, Any]]:
        busy = len(server.in_flight())
        return [
            {"id": i, "n_ctx": self.n_ctx, "speculative": False, "is_processing": i < busy}
            for i in range(self.total_slots)
        ]

    def _metrics(self, server: ScriptedServer) -> Answer:
        if not self.metrics:
            message = "This server does not support metrics endpoint. Start it with `--metrics`"
            return self.error(501, message)
        busy = len(server.in_flight())
        families = [
            Family(
                "llamacpp:prompt_tokens_total",
                "counter",
                "Number of prompt tokens processed.",
                [({}, self._counters.get("prompt", 0))],
            ),
            Family(
                "llamacpp:requests_processing",
                "gauge",
                "Number of requests processing.",
                [({}, min(busy, self.total_slots))],
            ),
            Family(
                "llamacpp:requests_deferred",
                "gauge",
                "Number of requests deferred.",
                [({}, max(busy - self.total_slots, 0))],
            ),
        ]
        return Answer(200, exposition(families, c_double), "text/plain; version=0.0.4")


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _timings(cached: int, evaluated: int, predicted: int) -> dict[str, Any]:
    prompt_ms = evaluated * _PROMPT_MS_PER_TOKEN
    predicted_ms = predicted * _PREDICTED_MS_PER_TOKEN
    return {
        "cache_n": cached,
        "prompt_n": evaluated,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": _PROMPT_MS_PER_TOKEN,
        "prompt_per_second": 1000 / _PROMPT_MS_PER_TOKEN,
        "predicted_n": predicted,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": _PREDICTED_MS_PER_TOKEN,
        "predicted_per_second": 1000 / _PREDICTED_MS_PER_TOKEN,
    }
