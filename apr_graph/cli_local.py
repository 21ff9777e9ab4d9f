"""The local backend of the ``apr`` command: its options, what it tells the user, its server.

``apr ask``, ``apr resume``, ``apr serve`` and ``apr bench --backend local`` share these: the
model file is read and checked before anything starts, so a bad path is one line and exit 3.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from apr_graph.cli_view import PlainView
from apr_graph.errors import InputError
from apr_graph.local import LocalServer, local_engine
from apr_graph.local_model import (
    DEFAULT_SLOTS,
    LocalDefaults,
    LocalModel,
    apply_local_defaults,
    local_defaults,
)
from apr_graph.settings import AprSettings

__all__ = [
    "DEMO_NOTICE",
    "LocalChoice",
    "add_local_options",
    "choose_local",
    "serve",
]

DEMO_NOTICE = (
    "apr: no server configured, so the embedded SmolLM2-135M-Instruct model runs locally. "
    "It is a demo of the mechanics, not of reasoning quality; for real answers run a real "
    "GGUF model (--local-model PATH) or point apr at a server: --base-url http://HOST:8000/v1 "
    "--model NAME (or OPENAI_BASE_URL, APR_MODEL)."
)

_LLAMA_CPP = "https://github.com/ggml-org/llama.cpp"
_OFF = {"off", "0", "false", "no"}


def add_local_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--local-model``, ``--local-ctx`` and ``--local-slots`` to ``parser``."""
    group = parser.add_argument_group("local model (runs when no server is configured)")
    group.add_argument(
        "--local-model",
        metavar="PATH",
        help="a GGUF model file to run [env APR_LOCAL_MODEL; the SmolLM2-135M demo]",
    )
    group.add_argument(
        "--local-ctx",
        type=int,
        metavar="N",
        help="context tokens per slot [env APR_LOCAL_CTX; fitted to the model]",
    )
    group.add_argument(
        "--local-slots",
        type=int,
        metavar="N",
        help=f"parallel slots of llama-server [env APR_LOCAL_SLOTS; {DEFAULT_SLOTS}]",
    )


def _count(
    given: int | None, environ: Mapping[str, str], env: str, option: str, low: int, high: int
) -> int | None:
    if given is None and environ.get(env, "").strip():
        try:
            given = int(environ[env])
        except ValueError:
            raise InputError(f"{env}={environ[env]!r} is not a whole number") from None
        option = f"{env}="
    if given is not None and not low <= given <= high:
        raise InputError(f"{option}{given}: give a number from {low} to {high}")
    return given


@dataclass(frozen=True)
class LocalChoice:
    """The model, the server and the settings the local backend will use."""

    model: LocalModel
    defaults: LocalDefaults
    engine: str
    """``llama-server`` (parallel slots) or ``llama-cpp-python`` (one request at a time)."""

    @property
    def parallel(self) -> bool:
        """Whether threads can run at once."""
        return self.engine == "llama-server"

    def server(self, *, host: str = "127.0.0.1", port: int = 0) -> LocalServer:
        """The server to start (not started yet)."""
        return LocalServer(
            model=self.model.path,
            alias=self.model.alias,
            port=port,
            host=host,
            slots=self.defaults.slots,
            ctx_per_slot=self.defaults.ctx_per_slot,
            startup_timeout_s=float(os.environ.get("APR_LOCAL_STARTUP_TIMEOUT", "180")),
            repack=os.environ.get("APR_LOCAL_REPACK", "").strip().lower() not in _OFF,
        )

    def notices(self) -> list[str]:
        """What the user should know before the server starts: model, engine, template."""
        lines = [
            DEMO_NOTICE
            if self.model.bundled
            else f"apr: no server configured, so {self.model.describe()} runs locally "
            f"from {self.model.path}"
        ]
        if self.model.tiny and not self.model.bundled:
            lines.append(
                "apr: a model this small cannot plan; it gets the demo's limits (one level of "
                "threads, short answers, 5 minutes)"
            )
        if not self.parallel:
            lines.append(
                "apr: llama-server is not on PATH, so the llama-cpp-python server runs one "
                "request at a time: threads will run one after another and save no time; for "
                f"{self.defaults.slots} parallel slots put llama.cpp's llama-server on PATH "
                f"({_LLAMA_CPP})"
            )
        if not self.model.info.has_chat_template:
            lines.append(
                "apr: the model file carries no chat template, so the server falls back to a "
                "generic one and answers may be garbled; use a GGUF that includes its template"
            )
        return lines

    def shape(self, server: LocalServer) -> str:
        """``4 slots x 8192 tokens``: what the running server can take."""
        if server.parallel_requests > 1:
            return f"{server.parallel_requests} slots x {self.defaults.ctx_per_slot} tokens"
        return f"one request at a time, {self.defaults.ctx_per_slot} tokens"

    def settings(
        self, settings: AprSettings, server: LocalServer
    ) -> tuple[AprSettings, dict[str, Any]]:
        """``settings`` aimed at ``server`` with this model's defaults, and the run record."""
        # Replicas are not this server; its port changes with every start, so its speed
        # profile is kept under its model file and slots.
        where = f"local://{self.model.path}?parallel={server.parallel_requests}"
        speed = {} if "speed_endpoint" in settings.model_fields_set else {"speed_endpoint": where}
        updated, sources = apply_local_defaults(
            settings.model_copy(update={"base_urls": [], **speed}),
            self.defaults,
            base_url=server.base_url,
            model=self.model.alias,
            parallel_requests=server.parallel_requests,
        )
        record = {
            "model": self.model.as_record(),
            "server": {
                "engine": server.kind,
                "parallel_requests": server.parallel_requests,
                "repack": server.repack,
                **self.defaults.as_record(),
            },
            "settings": sources,
        }
        return updated, record

    def start(
        self, stack: ExitStack, settings: AprSettings, *, notice: Callable[[str], None]
    ) -> tuple[AprSettings, dict[str, Any], LocalServer]:
        """Start the server (stopped when ``stack`` closes), telling the user what runs.

        Returns ``settings`` aimed at it with the model's defaults, the run record, and the
        server.
        """
        for line in self.notices():
            notice(line)
        notice(f"apr: starting {self.engine} with {self.model.path.name} ...")
        server = stack.enter_context(self.server())
        for line in server.notes:
            notice(line)
        notice(f"apr: {server.kind} ready at {server.base_url} ({self.shape(server)})")
        settings, record = self.settings(settings, server)
        if applied := record["settings"]["defaults"]:
            listed = ", ".join(
                f"{name} {value!r}" if isinstance(value, str) else f"{name} {_plain(value)}"
                for name, value in applied.items()
            )
            notice(
                f"apr: settings for this model: {listed} (options and APR_* variables override "
                "them; --trace records them)"
            )
        return settings, record, server

    def env_line(self) -> str:
        """The model's defaults as ``APR_*`` variables, for clients of ``apr serve``."""
        values = {"max_concurrency": self.defaults.slots if self.parallel else 1}
        values.update(self.defaults.settings)
        return " ".join(f"APR_{k.upper()}={shlex.quote(_plain(v))}" for k, v in values.items())


def _plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def choose_local(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> LocalChoice:
    """Read the local options (then ``APR_LOCAL_*``) and check the model file.

    Raises:
        InputError: a slot count or context size out of range.
        LocalBackendError: the model file is missing or not GGUF, or no engine is installed.
    """
    environ = os.environ if environ is None else environ
    slots = _count(args.local_slots, environ, "APR_LOCAL_SLOTS", "--local-slots ", 1, 64)
    ctx = _count(args.local_ctx, environ, "APR_LOCAL_CTX", "--local-ctx ", 256, 1 << 20)
    path = args.local_model or environ.get("APR_LOCAL_MODEL", "").strip() or None
    model = LocalModel.open(path)
    engine = local_engine()
    defaults = local_defaults(
        model, parallel=engine == "llama-server", slots=slots, ctx_per_slot=ctx
    )
    return LocalChoice(model=model, defaults=defaults, engine=engine)


def serve(args: argparse.Namespace) -> int:
    """``apr serve``: run the local model until Ctrl-C, saying how to use it."""
    plain = PlainView()
    local = choose_local(args)  # a bad model path fails here, before anything starts
    for line in local.notices()[1:]:  # the first says a run will use it; serve is not a run
        plain.notice(line)
    try:
        with local.server(port=args.port, host=args.host) as server:
            for line in server.notes:
                plain.notice(line)
            alias, url = local.model.alias, server.base_url
            demo = "SmolLM2-135M-Instruct, a demo model"
            what = demo if local.model.bundled else local.model.describe()
            plain.notice(
                f"apr: {server.kind} serving {alias} at {url} ({local.shape(server)}): {what}; "
                f'use it with: apr ask --base-url {url} --model {alias} "TASK". Ctrl-C stops it.'
            )
            plain.notice(f"apr: settings that fit this model, for its clients: {local.env_line()}")
            print(url, flush=True)  # last, so a reader of stdout knows it is up
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        plain.notice("apr: stopped the embedded model server")
    return 0
