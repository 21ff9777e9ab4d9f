"""LangGraph's own resume finishes an interrupted run, on every checkpointer.

The first run is stopped while a dependent thread hangs; a graph built anew (what a new
process, or LangGraph Server, does) continues it with ``ainvoke(None, config)`` or
``astream(None, config)``. Nothing apr-graph kept in memory is there any more: what the
dependent needs must come from the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

from apr_graph import AprSettings, compile_apr_graph
from apr_graph.errors import ServerUnreachableError
from apr_graph.testing import Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory, settings_for
from tests.test_cli import clean_env

Saver = BaseCheckpointSaver[Any]

HANGS = Reply(content="never", delay_s=60.0)


def chain_rules(*, hang: bool) -> list[Rule]:
    """s2 needs s1's result; with ``hang``, s2's first request never answers."""
    plan = {
        "strategy": "parallel",
        "merge": "concat",
        "subtasks": ["first part", "second part"],
        "depends_on": {"2": [1]},
    }
    rules = [Rule(role="planner", reply=Reply(content=plan))]
    if hang:  # the dependent's request, the one that carries s1's result
        rules.append(Rule(role="worker", contains="first is 7", times=1, reply=HANGS))
    return [
        *rules,
        quoting("second part", "first is 7"),
        Rule(role="worker", contains="first part", reply=Reply(content="first is 7")),
    ]


def quoting(goal: str, needed: str) -> Rule:
    """The worker of ``goal``: says whether its prompt carried the result ``needed``."""
    return Rule(
        role="worker",
        contains=goal,
        reply=lambda r: Reply(
            content=f"{goal}: " + ("had " if needed in r.last_user_message else "lacked ") + needed
        ),
    )


def nested_rules(*, hang: bool) -> list[Rule]:
    """The root forks s1; the fork's c2 needs c1's result; with ``hang``, c2 hangs once."""
    root = {
        "strategy": "parallel",
        "merge": "concat",
        "subtasks": ["big part", "small part"],
        "fork": [1],
    }
    child = {
        "strategy": "parallel",
        "merge": "concat",
        "subtasks": ["inner one", "inner two"],
        "depends_on": {"2": [1]},
    }
    rules = [
        Rule(role="planner", contains="big part", reply=Reply(content=child)),
        Rule(role="planner", reply=Reply(content=root)),
    ]
    if hang:
        rules.append(Rule(role="worker", contains="one is 5", times=1, reply=HANGS))
    rules += [
        quoting("inner two", "one is 5"),
        Rule(role="worker", contains="inner one", reply=Reply(content="one is 5")),
        Rule(role="worker", contains="small part", reply=Reply(content="small is 1")),
    ]
    return rules


def worker_requests(server: ScriptedServer, text: str) -> int:
    return sum(text in r.last_user_message for r in server.chat_requests("worker"))


async def stored_thread_ids(saver: Saver) -> set[str]:
    """Ids of every finished thread any checkpoint of any namespace holds."""
    found: set[str] = set()
    async for item in saver.alist(None):
        for _, channel, value in item.pending_writes or []:
            if channel == "threads":  # a run's first write replaces (``Overwrite``) the list
                found |= {t["id"] for t in getattr(value, "value", value)}
    return found


async def interrupt_when(
    app: Any, config: dict[str, Any], saver: Saver, server: ScriptedServer, finished: str, hang: str
) -> None:
    """Start a run and stop it once ``finished`` is in a checkpoint and the hanging request
    (the one quoting its result) reached the server."""
    run = asyncio.create_task(app.ainvoke({"task": "t"}, config))
    deadline = time.monotonic() + 30

    def hanging() -> bool:
        return worker_requests(server, hang) > 0

    while finished not in await stored_thread_ids(saver) or not hanging():
        assert not run.done(), run
        assert time.monotonic() < deadline, "the first thread never reached the checkpoint"
        await asyncio.sleep(0.05)
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run


def postgres_bin() -> Path | None:
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server on a loopback port, for this module's tests."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("langgraph.checkpoint.postgres")
    # Not under pytest's temporary folder: that one is closed to every user but the owner.
    base = Path(tempfile.mkdtemp(prefix="apr-pg-"))
    data = base / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    initdb = subprocess.run(
        [*run_as, str(binaries / "initdb"), "-D", str(data), "-U", "apr", "--auth=trust"],
        capture_output=True,
        check=False,
    )
    if initdb.returncode:
        pytest.fail(f"initdb failed: {initdb.stderr.decode(errors='replace')[-500:]}")
    server = subprocess.Popen(
        [
            *run_as,
            str(binaries / "postgres"),
            "-D",
            str(data),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(base),
            "-F",  # no fsync: a test database
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert server.poll() is None, "postgres exited at start"
            assert time.monotonic() < deadline, "postgres did not start"
            time.sleep(0.1)
        yield f"postgresql://apr@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.asynccontextmanager
async def memory_saver(shared: InMemorySaver) -> AsyncIterator[Saver]:
    yield shared


@contextlib.asynccontextmanager
async def sqlite_saver(db: Path) -> AsyncIterator[Saver]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        yield saver


@contextlib.asynccontextmanager
async def postgres_saver(url: str) -> AsyncIterator[Saver]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    async with AsyncPostgresSaver.from_conn_string(url) as saver:
        await saver.setup()
        yield saver


@dataclass(frozen=True)
class Store:
    """A checkpoint store that can be opened again, in this process or another one."""

    kind: str
    target: str = ""
    shared: InMemorySaver | None = None

    def open(self) -> AbstractAsyncContextManager[Saver]:
        if self.shared is not None:
            return memory_saver(self.shared)
        if self.kind == "sqlite":
            return sqlite_saver(Path(self.target))
        return postgres_saver(self.target)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return Store("memory", shared=InMemorySaver())
    if request.param == "sqlite":
        return Store("sqlite", str(tmp_path / "runs.sqlite"))
    url = request.getfixturevalue("postgres_url")
    schema = f"t{time.monotonic_ns()}"

    async def create() -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(f"CREATE SCHEMA {schema}")  # one schema per test: no leftovers

    asyncio.run(create())
    return Store("postgres", f"{url}?options=-csearch_path%3D{schema}")


FIRST_RUN = """
import asyncio, json, sys
from apr_graph import AprSettings, compile_apr_graph
kind, target, values = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

async def main():
    if kind == "sqlite":
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver as Saver
    else:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver as Saver
    async with Saver.from_conn_string(target) as saver:
        if kind == "postgres":
            await saver.setup()
        app = compile_apr_graph(settings=AprSettings(**values), checkpointer=saver)
        await app.ainvoke({"task": "t"}, {"configurable": {"thread_id": "job"}})

asyncio.run(main())
"""


async def killed_when(
    store: Store, settings: AprSettings, server: ScriptedServer, finished: str, hang: str
) -> None:
    """Run in a process of its own, killed once ``finished`` is in a checkpoint and the
    hanging request (the one quoting its result) reached the server."""
    values = settings.model_dump(mode="json", exclude_unset=True)
    values["api_key"] = settings.api_key.get_secret_value() if settings.api_key else None
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", FIRST_RUN, store.kind, store.target, json.dumps(values)],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        async with store.open() as saver:
            while finished not in await stored_thread_ids(saver) or not (
                worker_requests(server, hang)
            ):
                assert process.returncode is None, "the first run ended by itself"
                assert time.monotonic() < deadline, "the first thread never got stored"
                await asyncio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()


async def run_interrupted_then_resumed(
    server: ScriptedServer,
    store: Store,
    *,
    finished: str,
    hang: str,
    events: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    settings = settings_for(server, max_retries=0, **overrides)
    config: dict[str, Any] = {"configurable": {"thread_id": "job"}}
    if store.shared is None:  # killed, as a process is
        await killed_when(store, settings, server, finished, hang)
    else:  # the store lives in this process: the run is cancelled instead
        async with store.open() as saver:
            app = compile_apr_graph(settings=settings, checkpointer=saver)
            await interrupt_when(app, config, saver, server, finished, hang)
    async with store.open() as saver:  # a new graph: nothing of the first run's memory
        app = compile_apr_graph(settings=settings, checkpointer=saver)
        if events is None:
            return dict(await asyncio.wait_for(app.ainvoke(None, config), 30))
        values: dict[str, Any] = {}
        async with asyncio.timeout(30):
            async for mode, chunk in app.astream(None, config, stream_mode=["custom", "values"]):
                if mode == "values":
                    values = chunk
                else:
                    events.append(chunk)
        return values


async def test_ainvoke_none_finishes_a_run_whose_dependent_was_interrupted(
    make_server: ServerFactory, store: Store
) -> None:
    reference = make_server(chain_rules(hang=False))
    expected = await compile_apr_graph(settings=settings_for(reference)).ainvoke({"task": "t"})

    server = make_server(chain_rules(hang=True))
    result = await run_interrupted_then_resumed(server, store, finished="s1", hang="first is 7")

    assert result["answer"] == expected["answer"]
    assert "second part: had first is 7" in result["answer"]
    assert worker_requests(server, "Solve only this:\nfirst part") == 1  # not redone
    assert len(server.chat_requests("planner")) == 1
    assert {t["id"]: t["status"] for t in result["threads"]} == {"s1": "done", "s2": "done"}
    # The budget counts what the run spent before the interruption too (the plan, s1).
    spent = sum(c["prompt_tokens"] + c["completion_tokens"] for c in result["calls"])
    assert {c["role"] for c in result["calls"]} >= {"planner", "worker"}
    assert result["metrics"]["budget_tokens_used"] >= spent


async def test_astream_none_resumes_a_nested_fork_without_redoing_its_finished_thread(
    make_server: ServerFactory, store: Store
) -> None:
    reference = make_server(nested_rules(hang=False))
    settings = settings_for(reference, max_depth=2)
    expected = await compile_apr_graph(settings=settings).ainvoke({"task": "t"})
    assert "inner two: had one is 5" in expected["answer"]

    server = make_server(nested_rules(hang=True))
    events: list[dict[str, Any]] = []
    result = await run_interrupted_then_resumed(
        server, store, finished="s1", hang="one is 5", events=events, max_depth=2
    )

    assert result["answer"] == expected["answer"]
    started = [e["id"] for e in events if e["event"] == "thread_started"]
    closed = [e["id"] for e in events if e["event"] == "thread_finished"]
    assert started, events
    assert sorted(started) == sorted(closed)  # each started once, each closed once
    assert worker_requests(server, "Solve only this:\ninner one") == 1
    assert worker_requests(server, "Solve only this:\nsmall part") == 1
    assert len(server.chat_requests("planner")) == 2  # the root's plan and the fork's


def starving_rules() -> list[Rule]:
    """Four subtasks need the fifth, which the plan lists last."""
    plan = {
        "strategy": "parallel",
        "merge": "concat",
        "subtasks": [
            "use base for a",
            "use base for b",
            "use base for c",
            "use base for d",
            "base",
        ],
        "depends_on": {str(i): [5] for i in range(1, 5)},
    }
    return [
        Rule(role="planner", reply=Reply(content=plan)),
        quoting("use base for", "base is B"),
        Rule(role="worker", reply=Reply(content="base is B", delay_s=0.2)),
    ]


async def test_waiting_dependents_never_take_every_slot_async(make_server: ServerFactory) -> None:
    server = make_server(starving_rules())
    app = compile_apr_graph(settings=settings_for(server, max_threads=5, stream_plan=False))
    result = await asyncio.wait_for(app.ainvoke({"task": "t"}, {"max_concurrency": 2}), 30)
    assert result["answer"].count("had base is B") == 4
    assert len(server.chat_requests("worker")) == 5


def test_waiting_dependents_never_take_every_slot_sync(make_server: ServerFactory) -> None:
    server = make_server(starving_rules())
    app = compile_apr_graph(settings=settings_for(server, max_threads=5, stream_plan=False))
    with ThreadPoolExecutor(1) as pool:  # a hung invoke fails the test instead of hanging it
        result = pool.submit(app.invoke, {"task": "t"}, {"max_concurrency": 2}).result(30)
    assert result["answer"].count("had base is B") == 4
    assert len(server.chat_requests("worker")) == 5


async def test_a_second_run_on_one_langgraph_thread_keeps_only_its_own_records(
    make_server: ServerFactory,
) -> None:
    # A LangGraph thread is a conversation: the second task's answer, threads and calls are
    # its own, not merged with the first run's (the first plan had a third thread).
    first = {
        "strategy": "parallel",
        "merge": "concat",
        "subtasks": ["alpha 1", "alpha 2", "alpha 3"],
    }
    second = {"strategy": "parallel", "merge": "concat", "subtasks": ["beta 1", "beta 2"]}
    server = make_server(
        [
            Rule(role="planner", contains="first task", reply=Reply(content=first)),
            Rule(role="planner", contains="second task", reply=Reply(content=second)),
            Rule(role="worker", reply=lambda r: Reply(content="did " + r.last_user_message[-7:])),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server), checkpointer=InMemorySaver())
    config: dict[str, Any] = {"configurable": {"thread_id": "conversation"}}
    await app.ainvoke({"task": "first task"}, config)
    result = await app.ainvoke({"task": "second task"}, config)
    assert [t["goal"] for t in result["threads"]] == ["beta 1", "beta 2"]
    assert "alpha" not in result["answer"]
    assert len(result["calls"]) == result["metrics"]["model_calls"] == 3


async def test_a_run_whose_server_went_away_finishes_on_resume_once_one_is_back(
    make_server: ServerFactory,
) -> None:
    # Seen with llama-server killed mid-run: every thread was recorded as failed ("cannot
    # connect"), so `apr resume` merged the same failures again. The server is a run's, not
    # a thread's: the run stops in its checkpoint, and a resume runs the thread again.
    plan = {"strategy": "parallel", "merge": "concat", "subtasks": ["first part", "second part"]}
    answers = [Rule(role="worker", contains="first part", reply=Reply(content="first is 7"))]
    release = threading.Event()

    def dies(request: Any) -> Reply:  # s2's request is in flight when the server goes
        release.wait(10)
        gone.stop()
        return Reply(content="never said", cut_stream_after=0)

    gone = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", contains="second part", reply=dies),
            *answers,
        ]
    )
    saver = InMemorySaver()
    config: dict[str, Any] = {"configurable": {"thread_id": "gone"}}
    app = compile_apr_graph(settings=settings_for(gone, retry_max_wait_s=0.1), checkpointer=saver)
    run = asyncio.create_task(app.ainvoke({"task": "t"}, config))
    while "s1" not in await stored_thread_ids(saver) or not worker_requests(gone, "second"):
        assert not run.done(), run
        await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(ServerUnreachableError):
        await run

    back = make_server(
        [Rule(role="worker", contains="second part", reply=Reply(content="second is 8")), *answers]
    )
    again = compile_apr_graph(settings=settings_for(back), checkpointer=saver)
    result = await again.ainvoke(None, config)

    assert {t["id"]: t["status"] for t in result["threads"]} == {"s1": "done", "s2": "done"}
    assert "first is 7" in result["answer"]
    assert "second is 8" in result["answer"]
    assert back.chat_requests("planner") == []
    (redone,) = back.chat_requests("worker")  # s1 is not asked again
    assert "second part" in redone.last_user_message
