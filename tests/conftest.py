"""Shared fixtures: a scripted server per test and settings pointing at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from apr_graph import AprSettings
from apr_graph.testing import Rule, ScriptedServer

ServerFactory = Callable[..., ScriptedServer]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """Start scripted servers that stop when the test ends."""
    started: list[ScriptedServer] = []

    def factory(rules: list[Rule], **kwargs: Any) -> ScriptedServer:
        server = ScriptedServer(rules, **kwargs).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def settings_for(server: ScriptedServer, **overrides: Any) -> AprSettings:
    """Fast settings aimed at ``server``."""
    values: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "test-model",
        "max_retries": 2,
        "retry_max_wait_s": 2.0,
        "request_timeout_s": 10.0,
    }
    values.update(overrides)
    return AprSettings(**values)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own OPENAI_* / APR_* variables must not leak into tests.
    import os

    for name in list(os.environ):
        if name.startswith(("APR_", "OPENAI_")):
            monkeypatch.delenv(name)
