"""What the ``apr`` commands share: exit codes, the error they exit with, settings from the
options, the local model choice, the checked client, and imports made with the collector
paused."""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from apr_graph.cli_local import LocalChoice, choose_local
from apr_graph.errors import AprError, ModelNotFoundError
from apr_graph.settings import AprSettings

if TYPE_CHECKING:
    from apr_graph.llm import LLMClient

__all__ = [
    "EXIT_AUTH",
    "EXIT_CONFIG",
    "EXIT_INTERRUPTED",
    "EXIT_MODEL_ERROR",
    "EXIT_UNKNOWN_MODEL",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CliError",
    "checked_client",
    "default_db",
    "loading",
    "local_choice",
    "read_files",
    "settings_from",
    "unknown_model_error",
]

EXIT_MODEL_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNREACHABLE = 4
EXIT_AUTH = 5
EXIT_UNKNOWN_MODEL = 6
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A command's failure: one line on stderr and its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def unknown_model_error(client: LLMClient, model: str) -> CliError:
    """The error (exit 6) for a model the server does not know, with the names it offers."""
    from apr_graph.preflight import unknown_model_message

    try:
        offered = await client.list_models()
    except AprError:
        offered = []
    return CliError(unknown_model_message(client.base_url, model, offered), EXIT_UNKNOWN_MODEL)


@asynccontextmanager
async def checked_client(settings: AprSettings) -> AsyncIterator[LLMClient]:
    """A client of the server, closed on exit; the server's warnings go to stderr first (even
    with --quiet: the answer may be off), a model it does not know is ``unknown_model_error``."""
    with loading():
        from apr_graph.llm import LLMClient
        from apr_graph.preflight import check_server

    client = LLMClient(settings)
    try:
        for warning in await check_server(client):
            print(warning, file=sys.stderr)
        yield client
    except ModelNotFoundError as exc:
        raise await unknown_model_error(client, settings.model) from exc
    finally:
        await client.aclose()


OWN_PROCESS = False
"""Whether ``main`` runs as the console script: the process ends when the command does."""


@contextmanager
def loading() -> Iterator[None]:
    """Import heavy modules with the cycle collector paused: their million objects would be
    walked again and again while they load; in the console script they are then frozen."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if OWN_PROCESS:
            gc.freeze()
        if enabled:
            gc.enable()


def default_db() -> Path:
    """Where ``apr ask --thread-id`` keeps runs: ``$APR_DB``, else the user's cache folder."""
    return Path(os.environ.get("APR_DB") or Path.home() / ".cache" / "apr-graph" / "runs.sqlite")


def settings_from(args: argparse.Namespace) -> AprSettings:
    """Settings from the options given (then ``APR_*``/``OPENAI_*``); bad values exit 2."""
    names = ("base_url", "model", "api_key", "max_threads", "max_concurrency")
    given = {name: value for name in names if (value := getattr(args, name)) is not None}
    try:
        return AprSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise CliError(f"invalid settings: {problems}", EXIT_USAGE) from None


def local_choice(args: argparse.Namespace, settings: AprSettings) -> LocalChoice | None:
    """The local model to run, checked before anything starts; ``None``: use the server."""
    if args.local_model and args.base_url:
        raise CliError(
            "--local-model runs a model here and --base-url names a server: give one of them",
            EXIT_USAGE,
        )
    if settings.base_url is not None and not args.local_model:
        return None  # a configured server beats APR_LOCAL_MODEL, which stands in for one
    return choose_local(args)


FOLDER_FILES = 200
"""The most text files a folder given to ``--file`` may hold (a wrong path, such as a home
folder, is refused at once instead of read for minutes)."""


def read_files(paths: Sequence[str]) -> dict[str, str]:
    """The documents ``--file`` names, by path: ``-`` is standard input (named ``stdin``); a
    folder gives its UTF-8 text files (``_folder_files``), and says on stderr how many it
    read and how many others it skipped."""
    documents: dict[str, str] = {}
    for given in paths:
        if given == "-":
            documents["stdin"] = sys.stdin.read()
            continue
        path = Path(given)
        if not path.is_dir():
            try:
                documents[given] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CliError(f"--file {given}: not UTF-8 text ({exc})", EXIT_USAGE) from exc
            except OSError as exc:  # missing, not readable
                raise CliError(f"--file {given}: {exc.strerror or exc}", EXIT_USAGE) from exc
            continue
        found, skipped = 0, 0
        for file in _folder_files(path):
            try:
                documents[str(file)] = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            found += 1
            if found > FOLDER_FILES:
                raise CliError(
                    f"--file {given}: more than {FOLDER_FILES} text files; give a smaller "
                    "folder or the files themselves",
                    EXIT_USAGE,
                )
        if not found:
            raise CliError(f"--file {given}: no UTF-8 text file in this folder", EXIT_USAGE)
        others = f"; skipped {skipped} that are not UTF-8 text" if skipped else ""
        print(f"apr: --file {given}: {found} text files{others}", file=sys.stderr)
    return documents


def _folder_files(folder: Path) -> list[Path]:
    """A folder's files, sorted: in a git work tree the ones git tracks or would track (not
    what .gitignore ignores, such as a virtualenv); else (or if git ignores the whole
    folder) all, hidden ones and ``__pycache__`` aside."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(folder), "ls-files", "-z", "-co", "--exclude-standard"],
            capture_output=True,
            check=False,
        )
    except OSError:  # no git
        listed = None
    if listed is not None and listed.returncode == 0:
        names = sorted(set(listed.stdout.decode("utf-8", "replace").split("\0")) - {""})
        if names:  # none: git ignores the whole folder
            return [file for name in names if (file := folder / name).is_file()]
    return [
        file
        for file in sorted(folder.rglob("*"))
        if file.is_file()
        and not any(p.startswith(".") or p == "__pycache__" for p in file.relative_to(folder).parts)
    ]
