"""Test doubles for users and for our own tests: a scripted OpenAI-compatible server, and
personalities that make it answer like llama.cpp, vLLM, LiteLLM or ``transformers serve``,
and a server that replays a native reasoner's published trace."""

from apr_graph.testing.personalities import (
    VLLM,
    LiteLLMProxy,
    LlamaCpp,
    Personality,
    TransformersServe,
)
from apr_graph.testing.replay import ReplayServer
from apr_graph.testing.server import RecordedRequest, Reply, Rule, ScriptedServer

__all__ = [
    "VLLM",
    "LiteLLMProxy",
    "LlamaCpp",
    "Personality",
    "RecordedRequest",
    "ReplayServer",
    "Reply",
    "Rule",
    "ScriptedServer",
    "TransformersServe",
]
