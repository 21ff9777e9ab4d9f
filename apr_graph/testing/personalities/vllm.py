"""vLLM's OpenAI-compatible server as a personality of the scripted server.

Reproduced from vllm-project/vllm (https://github.com/vllm-project/vllm):

- ``vllm/entrypoints/openai/engine/serving.py`` ``_check_model``: an unknown model is a 404
  "The model `x` does not exist." (``NotFoundError``, ``param: "model"``);
  ``create_error_response`` and ``engine/protocol.py`` ``ErrorResponse``: the body is
  ``{"error": {"message", "type", "param", "code"}}`` since v0.10.1 (PR #22099), and was flat
  with ``"object": "error"`` before; ``_validate_input``: the context-length 400s;
- ``engine/protocol.py`` ``ModelCard``: ``/v1/models`` with ``owned_by: vllm``, ``root``,
  ``max_model_len``, ``permission``; ``UsageInfo.prompt_tokens_details.cached_tokens``, sent
  when the server runs with ``--enable-prompt-tokens-details``;
- ``vllm/v1/metrics/loggers.py``: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``
  and ``vllm:cache_config_info``, whose labels are ``CacheConfig.metrics_info()`` plus
  ``engine`` (``max_num_seqs`` is scheduler config and appears nowhere in ``/metrics``);
- ``api_server.py`` ``AuthenticationMiddleware``: with ``--api-key``, paths under ``/v1``
  without it get 401 ``{"error": "Unauthorized"}``; ``/health`` answers 200 with no body.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from apr_graph.testing import wire
from apr_graph.testing.personalities.base import Personality, Route
from apr_graph.testing.personalities.prometheus import Family, exposition
from apr_graph.testing.script import RecordedRequest, Reply
from apr_graph.testing.wire import Answer

if TYPE_CHECKING:
    from apr_graph.testing.server import ScriptedServer

__all__ = ["VLLM"]

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 501: "NotImplementedError"}
_CREATED = 1754000000


@dataclass
class VLLM(Personality):
    """``vllm serve``: the served model names only, context limits, Prometheus ``/metrics``.

    The served names are the server's models; the first is the model path (``root``).
    Tokens are counted as words, as in the scripted usage.

    Args:
        max_model_len: the context; a longer prompt, or prompt plus ``max_tokens``, is a 400.
        max_num_seqs: sequences run at once; in-flight requests beyond it show as waiting.
        block_size: KV-cache block size (prefix caching hits whole blocks).
        num_gpu_blocks: KV-cache blocks, reported by ``vllm:cache_config_info``.
        enable_prefix_caching: count prompt blocks seen before as cached.
        enable_prompt_tokens_details: ``--enable-prompt-tokens-details``: usage carries
            ``prompt_tokens_details.cached_tokens``.
        flat_errors: error bodies as vLLM before v0.10.1 wrote them (``"object": "error"``).

    Example:
        >>> from apr_graph.testing import VLLM, Reply, Rule, ScriptedServer
        >>> persona = VLLM(max_num_seqs=8, enable_prompt_tokens_details=True)
        >>> server = ScriptedServer([Rule(reply=Reply(content="hi"))], personality=persona)
    """

    max_model_len: int = 32768
    max_num_seqs: int = 256
    block_size: int = 16
    num_gpu_blocks: int = 20000
    enable_prefix_caching: bool = True
    enable_prompt_tokens_details: bool = False
    flat_errors: bool = False
    _blocks: set[bytes] = field(default_factory=set, init=False, repr=False)
    _counters: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def error(self, status: int, message: str | None, param: str | None = None) -> Answer:
        """``create_error_response``: nested since v0.10.1, flat before."""
        kind = _TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
        info = {"message": message or "", "type": kind, "param": param, "code": status}
        if self.flat_errors:
            return Answer(status, {"object": "error", **info, "param": None})
        return Answer(status, {"error": info})

    def not_found(self, path: str) -> Answer:
        """FastAPI's answer to a path without a route."""
        return Answer(404, {"detail": "Not Found"})

    def serves(self, path: str) -> bool:
        """FastAPI routes under ``/v1`` only: ``/chat/completions`` without it is a 404."""
        return path.startswith("/v1/")

    def authorise(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """``--api-key`` guards the paths under ``/v1`` only."""
        key = server.api_key
        if key is None or not request.path.startswith("/v1"):
            return None
        if request.headers.get("authorization") == f"Bearer {key}":
            return None
        return Answer(401, {"error": "Unauthorized"})

    def models(self, server: ScriptedServer) -> Any:
        """One ``ModelCard`` per served name."""
        permission = {
            "id": "modelperm-scripted",
            "object": "model_permission",
            "created": _CREATED,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_view": True,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        cards = [
            {
                "id": name,
                "object": "model",
                "created": _CREATED,
                "owned_by": "vllm",
                "root": server.models[0],
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [permission],
            }
            for name in server.models
        ]
        return {"object": "list", "data": cards}

    def routes(self, server: ScriptedServer) -> dict[str, Route]:
        """``/health``, ``/version`` and ``/metrics``."""
        return {
            "/health": Answer(200, b"", "application/octet-stream"),
            "/version": {"version": "0.11.0"},
            "/metrics": self._metrics,
        }

    def admit(self, server: ScriptedServer, request: RecordedRequest) -> Answer | None:
        """Served model names only; the prompt (and ``max_tokens``) must fit the context."""
        body = request.body or {}
        model = body.get("model")
        if model is not None and model not in server.models:
            return self.error(404, f"The model `{model}` does not exist.", "model")
        refusal = self.refuse_response_format(server, body)
        if refusal is not None:
            return refusal
        tokens, limit = wire.prompt_tokens(request), self.max_model_len
        if tokens >= limit:
            message = (
                f"This model's maximum context length is {limit} tokens. However, your "
                f"request has {tokens} input tokens. Please reduce the length of the input "
                "messages."
            )
            return self.error(400, message, "input_tokens")
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(wanted, int) and tokens + wanted > limit:
            message = (
                f"'max_tokens' or 'max_completion_tokens' is too large: {wanted}. This model's "
                f"maximum context length is {limit} tokens and your request has {tokens} "
                f"input tokens ({wanted} > {limit} - {tokens})."
            )
            return self.error(400, message, "max_tokens")
        return None

    def decorate(self, server: ScriptedServer, request: RecordedRequest, reply: Reply) -> Reply:
        """Counts tokens for ``/metrics``; with prompt token details, usage says what was cached."""
        prompt = request.all_text.split()
        cached = self._cached_tokens(prompt)
        with self._lock:
            for name, value in (
                ("prompt", len(prompt)),
                ("generation", len(reply.text().split())),
                ("queries", len(prompt)),
                ("hits", cached),
            ):
                self._counters[name] = self._counters.get(name, 0) + value
        if not self.enable_prompt_tokens_details:
            return reply
        counts = dict(reply.usage or wire.usage(request, reply.text()))
        counts["prompt_tokens_details"] = {"cached_tokens": cached}
        return dataclasses.replace(reply, usage=counts)

    def _cached_tokens(self, prompt: list[str]) -> int:
        """Tokens in whole blocks seen before; the last token is always computed again."""
        if not self.enable_prefix_caching:
            return 0
        digest, hits, missed = b"", 0, False
        with self._lock:
            for end in range(self.block_size, len(prompt) + 1, self.block_size):
                block = "\x1f".join(prompt[end - self.block_size : end]).encode()
                # Each block's hash covers its whole prefix, as vLLM chains block hashes.
                digest = hashlib.blake2b(digest + block, digest_size=16).digest()
                missed = missed or digest not in self._blocks
                hits += 0 if missed else self.block_size
                self._blocks.add(digest)
        last_block = (len(prompt) - 1) // self.block_size * self.block_size
        return min(hits, max(last_block, 0))

    def _metrics(self, server: ScriptedServer) -> Answer:
        labels = {"engine": "0", "model_name": server.models[0]}
        busy = len(server.in_flight())
        running, waiting = min(busy, self.max_num_seqs), max(busy - self.max_num_seqs, 0)
        with self._lock:
            counters = dict(self._counters)
        families = [
            Family(
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                [(labels, running)],
            ),
            Family(
                "vllm:num_requests_waiting",
                "gauge",
                "Number of requests waiting to be processed.",
                [(labels, waiting)],
            ),
            *self._counter_families(labels, counters),
            Family(
                "vllm:cache_config_info",
                "gauge",
                "Information of the LLMEngine CacheConfig",
                [(self._cache_config(), 1)],
            ),
        ]
        return Answer(200, exposition(families), "text/plain; version=0.0.4; charset=utf-8")

    def _counter_families(self, labels: dict[str, str], counters: dict[str, int]) -> list[Family]:
        helps = {
            "prompt": ("vllm:prompt_tokens_total", "Number of prefill tokens processed."),
            "generation": (
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
            ),
            "queries": (
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            ),
            "hits": (
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            ),
        }
        return [
            Family(name, "counter", text, [(labels, counters.get(key, 0))])
            for key, (name, text) in helps.items()
        ]

    def _cache_config(self) -> dict[str, str]:
        """``CacheConfig.metrics_info()``: every field as text, plus the engine index."""
        return {
            "block_size": str(self.block_size),
            "cache_dtype": "auto",
            "calculate_kv_scales": "False",
            "cpu_offload_gb": "0",
            "enable_prefix_caching": str(self.enable_prefix_caching),
            "engine": "0",
            "gpu_memory_utilization": "0.9",
            "is_attention_free": "False",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(self.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None",
            "swap_space": "4",
        }
