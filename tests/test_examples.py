"""Every example runs against the scripted server, as a user would run it: as ``__main__``,
with its command-line arguments and the environment pointing at the server (in this process,
which saves an interpreter start per example)."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from apr_graph.testing import RecordedRequest, Reply, Rule
from tests.conftest import CliRun, ServerFactory

EXAMPLES = Path(__file__).parent.parent / "examples"

ExampleRunner = Callable[..., CliRun]


@pytest.fixture
def run_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> ExampleRunner:
    """Run ``examples/<name>`` as ``python examples/<name> *args`` against ``server_url``."""

    def run(name: str, *args: str, server_url: str) -> CliRun:
        path = EXAMPLES / name
        monkeypatch.setenv("OPENAI_BASE_URL", server_url)
        monkeypatch.setenv("APR_MODEL", "test-model")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        capsys.readouterr()
        try:
            runpy.run_path(str(path), run_name="__main__")
            code: int | str | None = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    return run


def test_quickstart(make_server: ServerFactory, run_example: ExampleRunner) -> None:
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
    done = run_example("quickstart.py", "Solve (a) 17*23 (b) 2**12", server_url=server.base_url)
    assert done.code == 0, done.err
    assert done.out.strip() == "(a) 391 (b) 4096"
    assert "parallel, 2 threads, 4 calls" in done.err


def test_code_review(
    make_server: ServerFactory, run_example: ExampleRunner, tmp_path: Path
) -> None:
    (tmp_path / "a.py").write_text("def f(x):\n    return x / 0\n")
    (tmp_path / "b.py").write_text("import os\nos.system(input())\n")
    plan = {
        "strategy": "parallel",
        "subtasks": [{"id": "a", "goal": "review a.py"}, {"id": "b", "goal": "review b.py"}],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(
                role="worker", contains="review a.py", reply=Reply(content="a.py: division by zero")
            ),
            Rule(
                role="worker", contains="review b.py", reply=Reply(content="b.py: shell injection")
            ),
            Rule(
                role="synthesizer",
                reply=lambda r: Reply(
                    content=" | ".join(
                        line for line in r.last_user_message.splitlines() if ".py:" in line
                    )
                ),
            ),
        ]
    )
    done = run_example(
        "code_review.py", str(tmp_path / "a.py"), str(tmp_path / "b.py"), server_url=server.base_url
    )
    assert done.code == 0, done.err
    assert done.out.strip() == "a.py: division by zero | b.py: shell injection"
    planner = server.chat_requests("planner")[0].messages[-1]["content"]
    assert "os.system(input())" in planner  # the files reached the model as context
    # Each review read its own file only.
    for worker in server.chat_requests("worker"):
        read = [code for code in ("x / 0", "os.system") if code in worker.all_text]
        assert len(read) == 1, worker.all_text
    assert "2 reviews in parallel" in done.err


def test_tool_lookups(make_server: ServerFactory, run_example: ExampleRunner) -> None:
    plan = {
        "strategy": "parallel",
        "subtasks": [{"id": i, "goal": f"stock of {i}"} for i in ("bolts", "nuts", "gears")],
    }

    def worker(request: RecordedRequest) -> Reply:
        results = [m["content"] for m in request.messages if m.get("role") == "tool"]
        if results:
            return Reply(content=results[-1])
        item = request.last_user_message.split("stock of ")[1].split()[0]
        return Reply(tool_calls=[{"name": "stock_level", "arguments": {"item": item}}])

    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", reply=worker),
            Rule(
                role="synthesizer",
                reply=lambda r: Reply(
                    content=", ".join(
                        line.strip()
                        for line in r.last_user_message.splitlines()
                        if line.strip().isdigit()
                    )
                ),
            ),
        ]
    )
    done = run_example("tool_lookups.py", server_url=server.base_url)
    assert done.code == 0, done.err
    assert done.out.strip() == "1200, 860, 42"  # the numbers came from the tool


def test_agent_delegation(make_server: ServerFactory, run_example: ExampleRunner) -> None:
    def agent_model(request: RecordedRequest) -> Reply:
        results = [m["content"] for m in request.messages if m.get("role") == "tool"]
        if results:
            return Reply(content=f"Summary: {results[-1]}")
        return Reply(
            tool_calls=[
                {"name": "parallel_reasoning", "arguments": {"task": "Compare Python, Rust and Go"}}
            ]
        )

    plan = {
        "strategy": "parallel",
        "subtasks": [{"id": x, "goal": f"assess {x}"} for x in ("Python", "Rust", "Go")],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(
                role="worker", reply=lambda r: Reply(content=r.last_user_message.split()[3] + " ok")
            ),
            Rule(role="synthesizer", reply=Reply(content="all three are fine")),
            Rule(where=lambda r: r.role is None, reply=agent_model),
        ]
    )
    done = run_example(
        "agent_delegation.py", "Compare Python, Rust and Go", server_url=server.base_url
    )
    assert done.code == 0, done.err
    assert done.out.strip() == "Summary: all three are fine"
    assert len(server.chat_requests("worker")) == 3
