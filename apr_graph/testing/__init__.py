"""Test doubles for users and for our own tests: a scripted OpenAI-compatible server."""

from apr_graph.testing.server import RecordedRequest, Reply, Rule, ScriptedServer

__all__ = ["RecordedRequest", "Reply", "Rule", "ScriptedServer"]
