"""The embedded model, for real: the README's first command, ``apr serve``, no orphans.

These start the bundled SmolLM2-135M server (a few seconds each); ``.ci/run`` runs them.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_cli import apr_executable, clean_env

# Never skipped: the test command installs the local extra, and a missing engine must fail.
pytestmark = pytest.mark.slow


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_closed(port: int, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not port_open(port):
            return True
        time.sleep(0.02)
    return False


def test_ask_on_the_embedded_model_end_to_end() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [apr_executable(), "ask", "--json", "What is 2 + 2?"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["answer"].strip()
    assert payload["plan"]["strategy"] in {"direct", "parallel"}
    assert payload["metrics"]["model_calls"] >= 1
    assert payload["metrics"]["completion_tokens"] > 0
    assert "demo" in done.stderr  # the user is told what a 135M model is for
    port = int(re.search(r"ready at http://127\.0\.0\.1:(\d+)/v1", done.stderr).group(1))
    assert wait_closed(port), "the embedded server outlived apr"
    print(f"apr ask on the embedded model: {time.monotonic() - started:.1f}s")


def test_the_embedded_model_answers_without_repacked_weights(tmp_path: Path) -> None:
    # How apr runs a native llama.cpp on a VM that refuses the CPU's AMX: llama-cpp-python,
    # through apr's launcher, with no extra CPU buffer types.
    trace = tmp_path / "run.json"
    done = subprocess.run(
        [apr_executable(), "ask", "--trace", str(trace), "What is 2 + 2?"],
        env=clean_env(APR_LOCAL_REPACK="off"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    server = json.loads(trace.read_text())["local"]["server"]
    assert (server["engine"], server["repack"]) == ("llama-cpp-python", False)


def start_serve() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [apr_executable(), "serve"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str], sig: int) -> str:
    """Send ``sig``, wait for the exit, and never leave the process behind."""
    process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return err


def test_serve_keeps_the_model_up_until_ctrl_c() -> None:
    with start_serve() as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(f"{url}/models", timeout=10) as response:
                models = [m["id"] for m in json.load(response)["data"]]
            assert models == ["smollm2"]
            port = int(url.rsplit(":", 1)[1].split("/")[0])
        finally:
            err = stop(process, signal.SIGINT)
    assert process.returncode == 0, err
    assert "Ctrl-C stops it" in err
    assert wait_closed(port)


def test_killed_apr_leaves_no_server_behind() -> None:
    with start_serve() as process:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port_open(port)
        stop(process, signal.SIGKILL)  # no cleanup code of ours can run
    assert wait_closed(port), "the server was orphaned"
