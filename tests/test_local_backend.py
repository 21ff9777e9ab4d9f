"""``--local-model``: any GGUF file, parallel slots, defaults that fit the model.

A fake ``llama-server`` (``tests/fake_llama_server.py``) stands in for llama.cpp: it takes the
real command line and serves the scripted server on the port apr chose, so these tests check
what apr asks of the server, what it tells the user and what it records, in a second each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apr_graph.local import LocalServer
from tests.conftest import CliRunner, ServerFactory
from tests.test_cli import MODEL, apr_executable, clean_env, three_part_server
from tests.test_local_model import QWEN_15B, write_gguf

FAKE = Path(__file__).with_name("fake_llama_server.py")
TASK = "Solve 17*23, 2**12 and 99+1"
ANSWER = "(1) 391 (2) 4096 (3) 100"


def _path_without_llama_server() -> str:
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "llama-server").exists())


@pytest.fixture
def fake_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``llama-server`` on PATH; returns the file where it records its command line."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "llama-server"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{_path_without_llama_server()}")
    monkeypatch.setenv("PYTHONPATH", str(FAKE.parent.parent))
    record = tmp_path / "llama-server.json"
    monkeypatch.setenv("FAKE_LLAMA_RECORD", str(record))
    return record


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A GGUF file that reads as Qwen2.5-1.5B Q4_K_M (a sparse file of its size)."""
    path = write_gguf(
        tmp_path / "qwen2.5-1.5b-instruct-q4_k_m.gguf",
        {**QWEN_15B, "general.parameter_count": 1_543_714_304},
    )
    with path.open("r+b") as file:
        file.truncate(1_117_320_768)
    return path


def started(record: Path) -> dict[str, Any]:
    """What the fake server was started with: ``{"argv": [...], "pid": ...}``."""
    data: dict[str, Any] = json.loads(record.read_text())
    return data


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_a_gguf_runs_on_parallel_slots_with_defaults_that_fit_it(
    run_cli: CliRunner, fake_llama: Path, model: Path, tmp_path: Path
) -> None:
    trace = tmp_path / "run.json"
    done = run_cli("ask", "--local-model", str(model), "--trace", str(trace), TASK)
    assert done.code == 0, done.err
    assert done.out == ANSWER + "\n"

    argv = started(fake_llama)["argv"]
    assert option(argv, "-m") == str(model)
    assert (option(argv, "--parallel"), option(argv, "-c")) == ("4", str(4 * 8192))
    assert option(argv, "--alias") == "qwen2.5-1.5b-instruct-q4_k_m"
    assert "--jinja" in argv  # the model's own chat template
    assert "--no-repack" not in argv  # repacked weights are faster where the CPU runs them
    assert gone(started(fake_llama)["pid"]), "the model server outlived apr"

    assert "Qwen2.5 1.5B Instruct (1.54B parameters, 1.1 GB) runs locally" in done.err
    assert "(4 slots x 8192 tokens)" in done.err
    assert "settings for this model: max_concurrency 4, max_threads 4, max_depth 2" in done.err
    assert "not on PATH" not in done.err
    summary = done.err.strip().splitlines()[-1]
    assert "3 threads, two or more generating at once" in summary

    record = json.loads(trace.read_text())
    local = record["local"]
    assert local["model"]["tier"] == "real"
    assert local["model"]["parameters"] == 1_543_714_304
    assert local["server"] == {
        "engine": "llama-server",
        "parallel_requests": 4,
        "repack": True,
        "slots": 4,
        "ctx_per_slot": 8192,
        "chosen_by": {"slots": "model", "ctx_per_slot": "model"},
    }
    assert local["settings"]["defaults"]["deadline_s"] == 1020.0
    assert local["settings"]["yours"] == {}
    settings = record["settings"]
    assert (settings["max_depth"], settings["worker_max_tokens"]) == (2, 768)
    assert settings["model"] == "qwen2.5-1.5b-instruct-q4_k_m"
    metrics = record["metrics"]
    assert metrics["thread_span_s"] < metrics["thread_time_sum_s"]


def test_a_local_model_s_speed_is_kept_under_its_file_not_its_server_s_port(
    fake_llama: Path,
    model: Path,
    run_cli: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Each start of the model's server takes a new port: a profile kept under the port
    # would never be read again, by the next run or after apr calibrate.
    monkeypatch.setenv("APR_PREFER", "speed")
    speed = tmp_path / "speed.json"
    done = run_cli("calibrate", "--local-model", str(model), "--streams", "2", "--tokens", "16")
    assert done.code == 0, done.err
    (key,) = json.loads(speed.read_text())["endpoints"]
    assert key == f"qwen2.5-1.5b-instruct-q4_k_m @ local://{model}?parallel=4"

    trace = tmp_path / "run.json"
    done = run_cli("ask", "--local-model", str(model), "--trace", str(trace), TASK)
    assert done.code == 0, done.err
    decision = json.loads(trace.read_text())["plan"]["decision"]
    assert decision["by"] in {"speed", "plan"}, decision
    assert decision["speed_source"].startswith("apr calibrate"), decision
    assert "measuring" not in done.err  # calibrated: nothing to probe
    assert list(json.loads(speed.read_text())["endpoints"]) == [key]


@pytest.fixture
def ask_crashing(
    run_cli: CliRunner, fake_llama: Path, model: Path, tmp_path: Path, monkeypatch: Any
) -> Callable[[str], tuple[Any, dict[str, Any]]]:
    """``apr ask`` on the fake llama-server crashing as ``FAKE_LLAMA_CRASH`` says; returns
    the finished command and its trace."""

    def ask(mode: str) -> tuple[Any, dict[str, Any]]:
        monkeypatch.setenv("FAKE_LLAMA_CRASH", mode)
        trace = tmp_path / "run.json"
        done = run_cli("ask", "--local-model", str(model), "--trace", str(trace), TASK)
        return done, json.loads(trace.read_text()) if trace.exists() else {}

    return ask


def test_a_server_that_crashes_under_the_run_is_named_not_called_unreachable(
    ask_crashing: Callable[[str], tuple[Any, dict[str, Any]]], fake_llama: Path
) -> None:
    done, trace = ask_crashing("run")
    assert done.code == 3, done.err
    error = done.err.strip().splitlines()[-1]
    said = "apr: error: the embedded model server (llama-server) was killed by SIGSEGV"
    assert error.startswith(said)
    assert "cannot connect" not in error
    assert "CMAKE_ARGS='-DGGML_NATIVE=OFF" in error  # how to get a build that runs here
    assert "killed by SIGSEGV" in trace["error"]
    assert gone(started(fake_llama)["pid"])


@pytest.mark.parametrize(
    ("crash", "where"), [("amx", "on its first answer"), ("amx-load", "loading the model")]
)
def test_a_build_that_dies_at_first_use_runs_again_without_repacked_weights(
    ask_crashing: Callable[[str], tuple[Any, dict[str, Any]]],
    run_cli: CliRunner,
    fake_llama: Path,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash: str,
    where: str,
) -> None:
    # A native llama.cpp on a VM whose CPU reports AMX but refuses it: SIGSEGV on the first
    # request or while loading the model, fine with --no-repack.
    done, trace = ask_crashing(crash)
    assert done.code == 0, done.err
    assert done.out == ANSWER + "\n"
    told = [line for line in done.err.splitlines() if "--no-repack" in line]
    assert len(told) == 1
    assert f"build was killed by SIGSEGV {where}" in told[0]
    assert "APR_LOCAL_REPACK=off" in told[0]
    argv = started(fake_llama)["argv"]
    assert "--no-repack" in argv
    assert gone(started(fake_llama)["pid"])
    assert trace["local"]["server"]["repack"] is False

    # Told to, it starts that way at once: one start, nothing to say.
    monkeypatch.setenv("APR_LOCAL_REPACK", "off")
    done = run_cli("ask", "--local-model", str(model), TASK)
    assert done.code == 0, done.err
    assert "on its first answer" not in done.err
    assert "--no-repack" in started(fake_llama)["argv"]


def test_a_build_that_dies_without_repacked_weights_too_is_one_line_at_start(
    ask_crashing: Callable[[str], tuple[Any, dict[str, Any]]], fake_llama: Path
) -> None:
    done, _ = ask_crashing("always")
    assert done.code == 3, done.err
    error = done.err.strip().splitlines()[-1]
    assert error.startswith("apr: error: the embedded model server (llama-server) was killed")
    assert "also without repacked weights (--no-repack)" in error
    assert "CMAKE_ARGS='-DGGML_NATIVE=OFF" in error
    assert "Traceback" not in done.err
    assert gone(started(fake_llama)["pid"])


def test_llama_cpp_python_without_repacked_weights_runs_through_apr_s_launcher(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", _path_without_llama_server())
    server = LocalServer(model=model, port=8000, repack=False)
    command = server.command(model)
    assert command[1:4] == ["-m", "apr_graph.llama_cpp_server", "--no-repack"]
    assert option(command, "--model") == str(model)
    assert LocalServer(model=model, port=8000).command(model)[1:3] == ["-m", "llama_cpp.server"]


def test_options_and_variables_override_every_default(
    run_cli: CliRunner,
    fake_llama: Path,
    model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APR_LOCAL_SLOTS", "2")
    monkeypatch.setenv("APR_DEADLINE_S", "90")
    trace = tmp_path / "run.json"
    options = ["--local-model", str(model), "--local-ctx", "2048", "--max-threads", "3"]
    done = run_cli("ask", *options, "-q", "--trace", str(trace), TASK)
    assert done.code == 0, done.err
    argv = started(fake_llama)["argv"]
    assert (option(argv, "--parallel"), option(argv, "-c")) == ("2", "4096")
    record = json.loads(trace.read_text())
    assert record["local"]["server"]["chosen_by"] == {"slots": "option", "ctx_per_slot": "option"}
    assert record["local"]["settings"]["yours"] == {"max_threads": 3, "deadline_s": 90.0}
    assert (record["settings"]["max_threads"], record["settings"]["deadline_s"]) == (3, 90.0)
    assert record["settings"]["max_total_threads"] == 4  # two slots' worth
    assert record["settings"]["max_concurrency"] == 2


def test_the_model_can_come_from_the_environment(
    run_cli: CliRunner, fake_llama: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APR_LOCAL_MODEL", str(model))
    done = run_cli("ask", TASK)
    assert done.code == 0, done.err
    assert option(started(fake_llama)["argv"], "-m") == str(model)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing.gguf", "no such file"),
        ("notes.txt", "not a GGUF model file"),
        (".", "is a folder"),
    ],
)
@pytest.mark.parametrize("command", ["ask", "serve"])
def test_a_bad_model_path_is_one_line_exit_3_and_starts_nothing(
    run_cli: CliRunner,
    fake_llama: Path,
    tmp_path: Path,
    command: str,
    name: str,
    expected: str,
) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    args = [command, "--local-model", str(tmp_path / name)]
    done = run_cli(*args, *(["a task"] if command == "ask" else []))
    assert done.code == 3
    assert done.err.count("\n") == 1
    assert done.err.startswith(f"apr: error: local model {tmp_path / name}")
    assert expected in done.err
    assert not fake_llama.exists(), "a server was started for a model that cannot load"


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--local-slots", "0"], {}, "--local-slots 0: give a number from 1 to 64"),
        ([], {"APR_LOCAL_CTX": "lots"}, "APR_LOCAL_CTX='lots' is not a whole number"),
        ([], {"APR_LOCAL_SLOTS": "99"}, "APR_LOCAL_SLOTS=99: give a number from 1 to 64"),
        (["--base-url", "http://127.0.0.1:9/v1"], {}, "give one of them"),
    ],
)
def test_bad_local_options_are_usage_errors(
    run_cli: CliRunner,
    fake_llama: Path,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    expected: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    done = run_cli("ask", "--local-model", str(model), *args, "a task")
    assert done.code == 2
    assert expected in done.err
    assert not fake_llama.exists()


def test_the_local_model_option_beats_a_server_url_from_the_environment(
    run_cli: CliRunner, fake_llama: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    done = run_cli("ask", "--local-model", str(model), TASK)
    assert done.code == 0, done.err
    assert "--local-model given, so the configured server URL is not used" in done.err


def test_a_configured_server_beats_the_local_model_variable(
    run_cli: CliRunner,
    fake_llama: Path,
    model: Path,
    make_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = three_part_server(make_server)
    monkeypatch.setenv("APR_LOCAL_MODEL", str(model))
    done = run_cli("ask", "--base-url", server.base_url, "--model", MODEL, "Solve a, b and c")
    assert done.code == 0, done.err
    assert server.chat_requests()
    assert not fake_llama.exists()


def test_without_llama_server_threads_run_one_at_a_time_and_no_saving_is_claimed(
    run_cli: CliRunner,
    model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", _path_without_llama_server())
    monkeypatch.setenv("PYTHONPATH", str(FAKE.parent.parent))
    real_command = LocalServer.command
    commands: list[list[str]] = []

    def serial_fake(self: LocalServer, model: Path) -> list[str]:
        commands.append(real_command(self, model))  # the llama-cpp-python command line
        fake = [sys.executable, str(FAKE), "--serial", "-m", str(model), "--alias", self.alias]
        return [*fake, "--port", str(self.port)]

    monkeypatch.setattr(LocalServer, "command", serial_fake)
    trace = tmp_path / "run.json"
    done = run_cli("ask", "--local-model", str(model), "--trace", str(trace), TASK)
    assert done.code == 0, done.err
    assert done.out == ANSWER + "\n"
    lines = done.err.splitlines()
    assert sum("llama-server is not on PATH" in line for line in lines) == 1
    assert "threads will run one after another and save no time" in done.err
    assert "for 4 parallel slots put llama.cpp's llama-server on PATH" in done.err
    assert "(one request at a time, 8192 tokens)" in done.err
    assert lines[-1].endswith("3 threads: the server ran them one at a time")

    command = commands[0]
    assert command[1:3] == ["-m", "llama_cpp.server"]
    assert option(command, "--model") == str(model)
    assert option(command, "--n_ctx") == "8192"  # one slot: the whole context is its own
    assert option(command, "--model_alias") == "qwen2.5-1.5b-instruct-q4_k_m"
    assert "--chat_format" not in command  # the template the GGUF carries
    record = json.loads(trace.read_text())
    assert record["settings"]["max_concurrency"] == 1
    assert record["local"]["server"]["engine"] == "llama-cpp-python"
    assert record["metrics"]["service_overlap_s"] == 0


def test_a_tiny_model_of_ones_own_is_told_it_cannot_plan(
    run_cli: CliRunner, fake_llama: Path, tmp_path: Path
) -> None:
    tiny = write_gguf(tmp_path / "tiny.gguf", {"general.parameter_count": 135_000_000})
    done = run_cli("ask", "--local-model", str(tiny), "--json", TASK)
    assert done.code == 0, done.err
    assert "a model this small cannot plan" in done.err
    assert "the model file carries no chat template" in done.err
    assert "max_depth 1" in done.err
    assert "deadline_s 300" in done.err


def test_serve_runs_the_model_and_says_how_to_use_it(fake_llama: Path, model: Path) -> None:
    env = clean_env(
        PATH=os.environ["PATH"],
        PYTHONPATH=os.environ["PYTHONPATH"],
        FAKE_LLAMA_RECORD=str(fake_llama),
    )
    with subprocess.Popen(
        [apr_executable(), "serve", "--local-model", str(model), "--local-slots", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            with urllib.request.urlopen(f"{url}/models", timeout=10) as response:
                models = [m["id"] for m in json.load(response)["data"]]
        finally:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    alias = "qwen2.5-1.5b-instruct-q4_k_m"
    assert models == [alias]
    assert f"llama-server serving {alias} at {url} (2 slots x 8192 tokens): Qwen2.5 1.5B" in err
    assert f'use it with: apr ask --base-url {url} --model {alias} "TASK"' in err
    assert "APR_MAX_CONCURRENCY=2 APR_MAX_THREADS=2 APR_MAX_DEPTH=2" in err
    assert "runs locally" not in err  # serving is not a run
    assert gone(started(fake_llama)["pid"])


def test_bench_runs_a_local_model_with_its_defaults(
    fake_llama: Path, model: Path, tmp_path: Path
) -> None:
    from apr_graph.bench.main import main as bench

    out = tmp_path / "bench"
    options = ["--local-model", str(model), "--local-slots", "2"]
    suite = ["--suites", "control", "--tasks", "1", "--strategies", "adaptive"]
    assert bench(["--backend", "local", *options, *suite, "--no-plots", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["model"] == "qwen2.5-1.5b-instruct-q4_k_m"
    assert (results["settings"]["max_threads"], results["settings"]["max_depth"]) == (2, 2)
    assert option(started(fake_llama)["argv"], "--parallel") == "2"
    assert gone(started(fake_llama)["pid"])


def test_bench_refuses_a_bad_model_path_before_starting_anything(
    fake_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from apr_graph.bench.main import main as bench

    assert bench(["--backend", "local", "--local-model", str(tmp_path / "no.gguf")]) == 3
    assert "apr bench: error: local model" in capsys.readouterr().err
    assert not fake_llama.exists()


def test_bench_stops_when_the_local_server_crashes_and_names_it(
    fake_llama: Path,
    model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from apr_graph.bench.main import main as bench

    monkeypatch.setenv("FAKE_LLAMA_CRASH", "run")
    out = tmp_path / "bench"
    suite = ["--suites", "control", "--tasks", "3", "--strategies", "sequential"]
    code = bench(["--backend", "local", "--local-model", str(model), *suite, "--out", str(out)])
    assert code == 3
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("apr bench: error: the embedded model server (llama-server) was killed")
    assert "cannot connect" not in error
    assert gone(started(fake_llama)["pid"])
