"""Every example runs against the scripted server, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from apr_graph.testing import Reply, Rule
from tests.conftest import ServerFactory

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart(make_server: ServerFactory) -> None:
    plan = {
        "strategy": "parallel",
        "subtasks": [{"id": "a", "goal": "17*23"}, {"id": "b", "goal": "2**12"}],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", contains="17*23", reply=Reply(content="391")),
            Rule(role="worker", contains="2**12", reply=Reply(content="4096")),
            Rule(role="synthesizer", reply=Reply(content="(a) 391 (b) 4096")),
        ]
    )
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "APR_MODEL": "test-model"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "Solve (a) 17*23 (b) 2**12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(a) 391 (b) 4096"
    assert "parallel, 2 threads, 4 calls" in done.stderr
