"""Personalities: real OpenAI-compatible servers' routes, model policies, errors and quirks.

Give one to a ``ScriptedServer`` (or a ``SimulatedServer``) with ``personality=``; the rules
still decide the replies, the personality decides everything around them.
"""

from apr_graph.testing.personalities.base import Personality, Route
from apr_graph.testing.personalities.litellm import LiteLLMProxy
from apr_graph.testing.personalities.llama_cpp import LlamaCpp
from apr_graph.testing.personalities.transformers_serve import TransformersServe
from apr_graph.testing.personalities.vllm import VLLM

__all__ = ["VLLM", "LiteLLMProxy", "LlamaCpp", "Personality", "Route", "TransformersServe"]
