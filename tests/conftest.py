"""Shared fixtures: a scripted server per test and settings pointing at it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from apr_graph import AprSettings
from apr_graph.testing import Rule, ScriptedServer

ServerFactory = Callable[..., ScriptedServer]


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> object:
    """Collect with the cycle collector paused, then freeze what was imported.

    The test modules import LangGraph, LangChain and OpenAI: about a million objects that live
    for the whole session. The collector would walk them again and again while they load (a
    third of the collection time) and at every full collection during the run.
    """
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        gc.enable()


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """Start scripted servers that stop when the test ends."""
    started: list[ScriptedServer] = []

    def factory(rules: list[Rule], **kwargs: Any) -> ScriptedServer:
        server = ScriptedServer(rules, **kwargs).start()
        started.append(server)
        return server

    yield factory
    stop_promptly(started)


def stop_promptly(servers: list[ScriptedServer]) -> None:
    """Stop ``servers`` at once instead of half a second each.

    ``stop()`` waits for the serving loop to look at its stop flag, which it does between
    connections or every 0.5 s; connecting to it while it stops wakes it up. (Half a second
    per test was a third of the suite's time.)
    """
    addresses: list[tuple[str, int]] = []
    for server in servers:
        try:
            url = urlsplit(server.base_url)
        except RuntimeError:  # the test stopped it already
            continue
        addresses.append((url.hostname or "127.0.0.1", url.port or 0))
    stopping = [threading.Thread(target=server.stop) for server in servers]
    for thread in stopping:
        thread.start()
    deadline = time.monotonic() + 10  # a stop that hangs is left to the join's report
    while any(thread.is_alive() for thread in stopping) and time.monotonic() < deadline:
        for address in addresses:
            with contextlib.suppress(OSError):  # refused once it has closed: that is fine
                socket.create_connection(address, timeout=0.1).close()
        time.sleep(0.005)
    for thread in stopping:
        thread.join(timeout=5)
        assert not thread.is_alive(), "a scripted server did not stop"


def settings_for(server: ScriptedServer, **overrides: Any) -> AprSettings:
    """Fast settings aimed at ``server``.

    The fork decision is the scripted planner's alone (no router, no speed profile learned
    from the scripted server's instant replies, a chain of goals run as planned; also set by
    ``_clean_env`` for settings read from the environment): most tests script a plan and
    check what the graph does with it. ``tests/test_decision.py`` tests the decision with its
    defaults.
    """
    values: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "test-model",
        "max_retries": 2,
        "retry_max_wait_s": 2.0,
        "request_timeout_s": 10.0,
        "router": False,
        "learn_speed": False,
        "prefer": "quality",
    }
    values.update(overrides)
    return AprSettings(**values)


POLL_S = 0.02


def wait_until(condition: Callable[[], object], what: str, within_s: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within_s`` seconds naming ``what``.

    ``within_s`` only bounds a broken run: a passing test waits for the condition, not for
    the clock, so it is as fast on an idle machine and as reliable on a busy one.
    """
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {within_s:g}s waiting for {what}")
        time.sleep(POLL_S)


async def eventually(condition: Callable[[], object], what: str, within_s: float = 20.0) -> None:
    """``wait_until`` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {within_s:g}s waiting for {what}")
        await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class CliRun:
    """What one in-process run (of ``apr``, or an example) did: its exit code and output."""

    code: int | str | None
    out: str
    err: str


CliRunner = Callable[..., CliRun]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """Run the ``apr`` command in this process: ``run_cli("ask", "-q", "task", stdin=None)``.

    Much faster than a subprocess (no interpreter start, no imports); the environment comes
    from ``monkeypatch``. Tests that send signals still run ``apr`` as a subprocess.
    """
    from apr_graph.cli import main

    def run(*args: str, stdin: str | None = None) -> CliRun:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            code: int | str | None = main(list(args))
        except SystemExit as exc:
            code = exc.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)  # main() installs its own handler
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    return run


def pytest_sessionstart(session: pytest.Session) -> None:
    """Let the suite's subprocesses take Ctrl-C whatever started it.

    A job started with ``&`` from a non-interactive shell ignores SIGINT, Python keeps it
    ignored, and the children inherit that: the tests that press Ctrl-C on ``apr`` would
    wait for nothing. A handler (unlike "ignore") is reset by exec, so children get the
    default again.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# Read by the tests themselves (e.g. APR_UPDATE_SNAPSHOTS=1), so kept by ``_clean_env``.
TEST_SWITCHES = frozenset({"APR_UPDATE_SNAPSHOTS"})


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A developer's own OPENAI_* / APR_* variables must not leak into tests.
    for name in list(os.environ):
        if name.startswith(("APR_", "OPENAI_")) and name not in TEST_SWITCHES:
            monkeypatch.delenv(name)
    # Nor the speed profiles the developer's runs measured, nor a test's into theirs.
    monkeypatch.setenv("APR_SPEED_FILE", str(tmp_path / "speed.json"))
    # Tests script the planner's plan and check what the graph does with it: the decision
    # is the scripted planner's (no router, no speed learned from instant scripted replies,
    # a chain of goals run as planned).
    # tests/test_decision.py tests the decision with its defaults.
    monkeypatch.setenv("APR_ROUTER", "false")
    monkeypatch.setenv("APR_LEARN_SPEED", "false")
    monkeypatch.setenv("APR_PREFER", "quality")


SUITE_SETTINGS = frozenset({"APR_SPEED_FILE", "APR_ROUTER", "APR_LEARN_SPEED", "APR_PREFER"})
"""What ``_clean_env`` sets for every test: kept in the environment of its subprocesses."""
