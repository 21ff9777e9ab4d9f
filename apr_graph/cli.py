"""The ``apr`` command: ask a question, or serve the embedded model.

    apr ask "Solve (a) 17*23 (b) 2**12"            # embedded demo model, no server needed
    apr ask --base-url http://gpu:8000/v1 --model Qwen/Qwen3-8B --json "..."
    apr ask --thread-id job-1 "..."                # checkpointed; after a crash:
    apr resume job-1                               # finishes it without redoing finished work
    apr runs                                       # the runs kept, with status and task
    apr ask --local-model ~/models/qwen2.5-1.5b-instruct-q4_k_m.gguf "..."   # any GGUF file
    apr serve                                      # keep the embedded model up for others
    apr calibrate --base-url http://gpu:8000/v1    # measure what parallel threads buy there

Exit codes: 0 ok, 1 model call failed, 2 bad usage or input (a task too long for the model's
context too), 3 configuration (the local extra is missing, the server cannot do tools),
4 server unreachable, 5 API key refused, 6 unknown model, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from apr_graph import cli_common
from apr_graph.cli_calibrate import add_calibrate_command, calibrate_command
from apr_graph.cli_common import (
    EXIT_AUTH,
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_MODEL_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    checked_client,
    default_db,
    loading,
    local_choice,
    read_files,
    settings_from,
)
from apr_graph.cli_local import add_local_options, serve
from apr_graph.cli_view import View, make_view
from apr_graph.errors import (
    AprError,
    AuthenticationError,
    ConfigurationError,
    ContextOverflowError,
    InputError,
    ServerCapabilityError,
    ServerUnreachableError,
)
from apr_graph.settings import AprSettings
from apr_graph.state import AprInput

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from apr_graph.local import LocalServer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apr", description="Adaptive parallel reasoning on any OpenAI-compatible server."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", help="OpenAI-compatible endpoint [env OPENAI_BASE_URL]")
    common.add_argument("--model", help="model name [env APR_MODEL]")
    common.add_argument("--api-key", help="API key [env OPENAI_API_KEY]; never stored")
    common.add_argument("--max-threads", type=int, help="most threads per decomposition [8]")
    common.add_argument("--max-concurrency", type=int, help="most requests in flight [8]")
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--trace", type=Path, help="write the full run record to this JSON file")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    db_help = f"SQLite file of resumable runs [env APR_DB, {default_db()}]"
    common.add_argument("--db", type=Path, help=db_help)
    add_local_options(common)

    ask = commands.add_parser(
        "ask", parents=[common], help="answer a task, forking into parallel threads if useful"
    )
    ask.add_argument("task", help="the task; '-' reads it from standard input")
    ask.add_argument("--context", help="extra context the model may use")
    ask.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="PATH",
        help="a file the model may use, named by its path (repeat it for several; '-' reads "
        "one from stdin; a folder gives its text files); a thread whose goal names some of "
        "the files reads only those (setting thread_documents)",
    )
    ask.add_argument(
        "--thread-id", help="checkpoint the run under this id, so 'apr resume ID' can finish it"
    )
    ask.add_argument(
        "--review",
        action="store_true",
        help="show the plan and run its threads only once you say so, or edit its goals "
        "(answers read on standard input)",
    )

    resume = commands.add_parser(
        "resume", parents=[common], help="finish an interrupted 'apr ask --thread-id ID' run"
    )
    resume.add_argument("thread_id", help="the id given to apr ask --thread-id")
    add_calibrate_command(commands, common)

    runs = commands.add_parser("runs", help="list the runs kept by 'apr ask --thread-id'")
    runs.add_argument("--db", type=Path, help=db_help)
    commands.add_parser(
        "bench",
        help="speed and accuracy of the strategies side by side: apr bench --help",
        add_help=False,
    )
    serve = commands.add_parser("serve", help="run the embedded model server until Ctrl-C")
    serve.add_argument("--port", type=int, default=0, help="listen port [a free one]")
    serve.add_argument("--host", default="127.0.0.1", help="listen address [127.0.0.1]")
    add_local_options(serve)
    return parser


def _load_graph() -> None:
    """Import the graph and the client (most of what ``_run`` imports)."""
    with loading():
        for module in ("apr_graph.graph", "apr_graph.llm"):
            importlib.import_module(module)


def _inputs(args: argparse.Namespace) -> AprInput:
    """The task (``-``: standard input) and its ``--context`` text or ``--file`` documents."""
    task = sys.stdin.read() if args.task == "-" else args.task
    if not task.strip():
        raise CliError('the task is empty: apr ask "your question"', EXIT_USAGE)
    if args.context and args.file:
        raise CliError(
            "--context and --file do not combine: put the text in a file and pass it "
            "with --file too",
            EXIT_USAGE,
        )
    if args.task == "-" and "-" in args.file:
        raise CliError("the task and a --file cannot both come from stdin", EXIT_USAGE)
    context = read_files(args.file) or args.context
    return {"task": task, "context": context} if context else {"task": task}


async def _run(
    settings: AprSettings,
    inputs: AprInput | None,
    view: View,
    record: dict[str, Any],
    *,
    thread_id: str | None,
    db: Path,
) -> dict[str, Any]:
    """Run (``inputs``) or resume (``None``) the graph, streaming events to ``view``."""
    with loading():
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
        from langgraph.types import Command

        from apr_graph.cli_review import review_reply
        from apr_graph.durable import run_status
        from apr_graph.graph import create_apr_graph

    async with checked_client(settings) as client, AsyncExitStack() as stack:
        saver: Any = None
        db_saver = thread_id is not None
        if db_saver:
            db.parent.mkdir(parents=True, exist_ok=True)
            saver = await stack.enter_async_context(AsyncSqliteSaver.from_conn_string(str(db)))
        elif settings.review_plan:  # the run waits for the review in a checkpoint
            from langgraph.checkpoint.memory import InMemorySaver

            saver, thread_id = InMemorySaver(), "apr-ask-review"
        app = create_apr_graph(settings=settings, client=client).compile(
            checkpointer=saver, name="apr-graph"
        )
        config: RunnableConfig = {"configurable": {"thread_id": thread_id}} if saver else {}
        if inputs is None:
            status, values = await run_status(app, config)
            if status == "finished":
                view.notice(f"apr: run {thread_id!r} had already finished")
                return values
            if status == "new":
                raise CliError(
                    f"no run is stored under thread id {thread_id!r} in {db}", EXIT_USAGE
                )
            record["task"] = values.get("task")
        state: dict[str, Any] = {}
        given: Any = inputs
        while True:
            async for mode, chunk in app.astream(
                given,
                config,
                stream_mode=["custom", "values"],
                durability="sync" if saver else None,
            ):
                payload: dict[str, Any] = cast(dict[str, Any], chunk)
                if mode == "custom":
                    if payload.get("event") != "token":  # threads' text: in their records
                        record["events"].append({"t": round(time.time(), 4), **payload})
                    view.on_event(payload)
                else:
                    state = payload
            paused = (await app.aget_state(config)).interrupts if saver else ()
            if not paused:  # else its plan waits for review (--review, or a resumed run)
                return state
            stored = thread_id if db_saver else None
            given = Command(resume=review_reply(view, paused[0].value, stored))


def _output(state: dict[str, Any]) -> dict[str, Any]:
    return {key: state.get(key) for key in ("answer", "plan", "threads", "metrics", "calls")}


def _ask(args: argparse.Namespace) -> int:
    resuming = args.command == "resume"
    inputs = None if resuming else _inputs(args)
    thread_id: str | None = args.thread_id
    db = args.db or default_db()
    if resuming:
        with loading():
            from apr_graph.cli_runs import missing_run
        if (unknown := missing_run(db, args.thread_id)) is not None:  # before any server starts
            raise CliError(unknown, EXIT_USAGE)
    settings = settings_from(args)
    if getattr(args, "review", False):
        if args.task == "-" or "-" in args.file:
            raise CliError(
                "--review reads its answers on stdin: give the task and the files as arguments",
                EXIT_USAGE,
            )
        settings = settings.model_copy(update={"review_plan": True})
    # With --json the output is for a program: the run's notices stay out of its way.
    view = make_view(quiet=args.quiet, run_notices=not args.json)
    record: dict[str, Any] = {
        "task": inputs["task"] if inputs else None,
        "thread_id": thread_id,
        "started_at": time.time(),
        "status": "running",
        "events": [],
    }
    local = local_choice(args, settings)
    server: LocalServer | None = None
    with ExitStack() as stack:
        if local is not None:
            if settings.base_url is not None:
                view.notice("apr: --local-model given, so the configured server URL is not used")
            # The model server takes seconds to start: the graph loads meanwhile, on another core.
            loader = threading.Thread(target=_load_graph, name="apr-load", daemon=True)
            loader.start()
            try:
                settings, record["local"], server = local.start(stack, settings, notice=view.notice)
            finally:
                loader.join()
        record["settings"] = settings.model_dump(mode="json", exclude={"api_key"})
        if thread_id is not None and not resuming:
            view.notice(
                f"apr: run {thread_id!r} is checkpointed in {db}; "
                f"if it is interrupted, finish it with: apr resume {thread_id}"
            )
        if view.wants_tokens:  # a live table counts each running thread's tokens
            settings = settings.model_copy(update={"stream_tokens": True})
        stack.enter_context(view)
        try:
            state = asyncio.run(_run(settings, inputs, view, record, thread_id=thread_id, db=db))
            record.update(status="done", **_output(state))
        except BaseException as exc:
            crashed = server.crash_error() if server is not None else None
            record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            record["error"] = str(crashed or exc)
            if crashed is not None and isinstance(exc, AprError):
                raise crashed from exc
            raise
        finally:
            if args.trace is not None:
                text = json.dumps(record, indent=2, default=str)
                secret = settings.api_key.get_secret_value()
                if len(secret) >= 4:
                    text = text.replace(secret, "***")  # belt and braces: never recorded
                args.trace.write_text(text + "\n")
    print(json.dumps(_output(state), default=str) if args.json else state.get("answer", ""))
    view.summary(state.get("metrics") or {})
    return 0


def _runs(args: argparse.Namespace) -> int:
    with loading():
        from apr_graph.cli_runs import describe_runs, list_runs

    print(describe_runs(list_runs(args.db or default_db())))
    return 0


_EXIT_CODES: tuple[tuple[type[AprError] | tuple[type[AprError], ...], int], ...] = (
    (ServerUnreachableError, EXIT_UNREACHABLE),
    (AuthenticationError, EXIT_AUTH),
    ((InputError, ContextOverflowError), EXIT_USAGE),
    ((ConfigurationError, ServerCapabilityError), EXIT_CONFIG),
    (AprError, EXIT_MODEL_ERROR),
)
"""The exit code of an ``AprError``: the first entry it is an instance of."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run the same cleanup as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apr`` console script."""
    if argv is not None:
        return _main(list(argv))
    cli_common.OWN_PROCESS = True
    try:
        return _main(sys.argv[1:])
    finally:
        gc.freeze()  # all that is alive lives until exit: the last collections skip it


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        with loading():
            from apr_graph.bench.main import main as bench

        return bench(argv[1:])
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        commands = {"serve": serve, "runs": _runs, "calibrate": calibrate_command}
        return commands.get(args.command, _ask)(args)
    except KeyboardInterrupt:
        print("apr: interrupted; in-flight requests were cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, AprError) as exc:
        message, code = str(exc), getattr(exc, "code", EXIT_MODEL_ERROR)
        if isinstance(exc, AprError):
            code = next(code for kinds, code in _EXIT_CODES if isinstance(exc, kinds))
        if isinstance(exc, ServerUnreachableError):
            hint = "start it, fix --base-url, or leave the URL unset to use the embedded demo model"
            if thread_id := getattr(args, "thread_id", None):  # its finished threads are kept
                hint = f"once it is back, 'apr resume {thread_id}' finishes the run"
            message = f"{message} ({hint})"
        # One line: whatever a server or a library put in the message, line breaks included.
        print(f"apr: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(code) from exc


if __name__ == "__main__":
    sys.exit(main())
