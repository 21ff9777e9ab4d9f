"""A run's life through the public API: cancellation that cancels, boards that go away, errors
that stay inside the hierarchy, and arguments refused when the graph is built."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from langchain_core.language_models import FakeListChatModel

from apr_graph import (
    AprError,
    AprSettings,
    AuthenticationError,
    ConfigurationError,
    LLMClient,
    ModelCallError,
    compile_apr_graph,
)
from apr_graph.graph import boards_of
from apr_graph.testing import Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory, eventually, settings_for, wait_until

PLAN = {
    "strategy": "parallel",
    "subtasks": [{"id": "a", "goal": "part a"}, {"id": "b", "goal": "part b"}],
}
SLOW = Reply(content=" ".join(["word"] * 200), chunk_delay_s=0.02)  # ~4 s streamed


async def _wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_cancelling_the_caller_closes_every_request_within_half_a_second(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=PLAN)),
            Rule(role="worker", reply=SLOW),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    run = asyncio.ensure_future(app.ainvoke({"task": "two slow parts"}))
    await _wait_until(lambda: len(server.chat_requests("worker")) == 2, timeout_s=30)
    cancelled_at = time.monotonic()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    workers = server.chat_requests("worker")
    await _wait_until(lambda: all(r.ended_at is not None for r in workers))
    assert [r.status for r in workers] == [499, 499]  # the server saw the client hang up
    assert max(r.ended_at or 0 for r in workers) - cancelled_at < 0.5
    assert len(boards_of(app)) == 0


async def test_a_run_that_times_out_stops_its_threads(make_server: ServerFactory) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content=PLAN)), Rule(role="worker", reply=SLOW)]
    )
    app = compile_apr_graph(settings=settings_for(server))
    workers = lambda: server.chat_requests("worker")  # noqa: E731

    async def run_until_both_threads_run() -> None:
        async with asyncio.timeout(None) as scope:

            async def expire_once_both_threads_run() -> None:
                await _wait_until(lambda: len(workers()) == 2, timeout_s=30)
                scope.reschedule(asyncio.get_running_loop().time())

            watchers.append(asyncio.ensure_future(expire_once_both_threads_run()))
            await app.ainvoke({"task": "two slow parts"})

    watchers: list[asyncio.Future[None]] = []
    with pytest.raises(TimeoutError):
        await run_until_both_threads_run()
    await watchers[0]
    timed_out = time.monotonic()
    await _wait_until(lambda: all(r.ended_at is not None for r in workers()))
    assert [r.status for r in workers()] == [499, 499]
    assert max(r.ended_at or 0 for r in workers()) - timed_out < 0.5
    assert len(boards_of(app)) == 0


async def test_no_board_is_left_behind_by_100_failing_runs(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=Reply(content=PLAN))], api_key="the-right-key")
    settings = settings_for(server, api_key="a-wrong-key", probe_capacity=False)
    app = compile_apr_graph(settings=settings)
    for _ in range(100):
        with pytest.raises(AuthenticationError):
            await app.ainvoke({"task": "anything"})
    assert len(boards_of(app)) == 0


async def test_no_board_is_left_behind_when_a_thread_fails_the_run(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=PLAN)),
            Rule(role="worker", reply=Reply(status=500, error_message="boom")),
        ]
    )
    settings = settings_for(server, on_thread_error="fail", max_retries=0)
    app = compile_apr_graph(settings=settings)
    with pytest.raises(ModelCallError, match="boom"):
        await app.ainvoke({"task": "two parts"})
    assert len(boards_of(app)) == 0


def merging_server(make_server: ServerFactory) -> ScriptedServer:
    """A server whose runs plan two parts, answer each "done" and merge them as "merged"."""
    return make_server(
        [
            Rule(role="planner", reply=Reply(content=PLAN)),
            Rule(role="worker", reply=Reply(content="done")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )


async def test_successful_runs_release_their_boards(make_server: ServerFactory) -> None:
    server = merging_server(make_server)
    app = compile_apr_graph(settings=settings_for(server))
    for _ in range(3):
        assert (await app.ainvoke({"task": "two parts"}))["answer"] == "merged"
    assert len(boards_of(app)) == 0


def _helper_threads() -> int:
    return sum(thread.name == "apr-graph" for thread in threading.enumerate())


def graphs_of_their_own(
    server: ScriptedServer, clients: list[weakref.ref[LLMClient]], runs: int = 3
) -> Iterator[Any]:
    """A graph with a client of its own per run (weak references to the clients go to
    ``clients``); nothing here keeps one alive once the caller drops it."""
    for _ in range(runs):
        client = LLMClient(settings_for(server))
        clients.append(weakref.ref(client))
        app = compile_apr_graph(client=client)
        del client
        yield app
        del app


async def test_a_graph_built_per_run_leaves_nothing_behind(make_server: ServerFactory) -> None:
    # A web handler that builds a graph per request: each graph's client (its connection
    # pool) must go when the graph does, though the pool lives on the caller's loop.
    threads_before = _helper_threads()
    clients: list[weakref.ref[LLMClient]] = []
    for app in graphs_of_their_own(merging_server(make_server), clients):
        assert (await app.ainvoke({"task": "two parts"}))["answer"] == "merged"
        del app

    def released() -> bool:
        gc.collect()
        return all(ref() is None for ref in clients) and _helper_threads() <= threads_before

    await eventually(released, "the clients of dropped graphs to be collected")


def test_a_graph_built_per_sync_run_leaves_nothing_behind(make_server: ServerFactory) -> None:
    # The same with invoke(): each client's helper loop (its thread, and the pool on it) must
    # go with it. A helper loop first started inside a run kept that run's context through
    # the loop's own reader (the LangGraph config, the graph, the client): one thread and a
    # pool leaked per request.
    threads_before = _helper_threads()
    clients: list[weakref.ref[LLMClient]] = []
    for app in graphs_of_their_own(merging_server(make_server), clients):
        assert app.invoke({"task": "two parts"})["answer"] == "merged"
        del app

    def released() -> bool:
        gc.collect()
        return all(ref() is None for ref in clients) and _helper_threads() <= threads_before

    wait_until(released, "the clients and helper threads of dropped graphs to go")


async def test_pooled_connections_do_not_keep_finished_runs_alive(
    make_server: ServerFactory,
) -> None:
    # One long-lived graph: its pool keeps connections open between runs. What a request
    # leaves on the loop (a connection's reader, the pool's keep-alive timer) keeps the context
    # it was made in; a request running in its caller's context would pin that run's
    # LangGraph loop, and with it the run's whole state, for as long as the connection lives.
    from langgraph.pregel._loop import AsyncPregelLoop

    # Runs of earlier tests in this process (still winding down) are not this graph's.
    earlier = weakref.WeakSet(o for o in gc.get_objects() if isinstance(o, AsyncPregelLoop))
    server = merging_server(make_server)
    async with LLMClient(settings_for(server)) as client:
        app = compile_apr_graph(client=client)
        for _ in range(2):
            assert (await app.ainvoke({"task": "two parts"}))["answer"] == "merged"

        def finished_runs_alive() -> int:
            gc.collect()
            objects = gc.get_objects()
            return sum(isinstance(o, AsyncPregelLoop) and o not in earlier for o in objects)

        await eventually(lambda: finished_runs_alive() == 0, "finished runs to be collected")


async def test_a_chat_models_runs_still_nest_under_the_graphs() -> None:
    # Requests through a LangChain chat model do run in their caller's context: LangChain
    # reads its parent run (and the callbacks of astream_events and tracing) from it.
    model = FakeListChatModel(responses=['{"strategy": "direct", "working": "2+2", "answer": "4"}'])
    app = compile_apr_graph(model=model)
    events = [e["event"] async for e in app.astream_events({"task": "2+2?"}, version="v2")]
    assert events.count("on_chat_model_start") == 1
    assert "on_chat_model_stream" in events


async def test_junk_retry_after_is_no_advice_and_stays_in_the_hierarchy(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=Reply(status=503, headers={"Retry-After": "soon"}))])
    client = LLMClient(settings_for(server, max_retries=1, retry_max_wait_s=0.05))
    with pytest.raises(ModelCallError, match="after 2 requests") as info:
        await client.chat([{"role": "user", "content": "q"}], role="worker")
    assert isinstance(info.value.__cause__, openai.InternalServerError)
    assert len(server.chat_requests()) == 2


async def test_an_error_apr_raises_itself_is_not_its_own_cause(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=Reply(content="x"))])
    client = LLMClient(settings_for(server))

    class Spent:
        def admits(self) -> bool:
            return False

        def charge(self, tokens: int) -> None:
            raise AssertionError("nothing was sent")

        def remaining_s(self) -> float | None:
            return None

    with pytest.raises(AprError) as info:
        await client.chat([{"role": "user", "content": "q"}], role="worker", budget=Spent())
    assert info.value.__cause__ is not info.value
    assert server.chat_requests() == []


def test_native_mode_with_a_chat_model_is_refused_when_the_graph_is_built() -> None:
    model = FakeListChatModel(responses=["x"])
    with pytest.raises(ConfigurationError, match="drop model="):
        compile_apr_graph(model=model, settings=AprSettings(native="threadweaver"))


def test_model_and_client_together_are_refused() -> None:
    client = LLMClient(AprSettings(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(ConfigurationError, match="not both"):
        compile_apr_graph(model=FakeListChatModel(responses=["x"]), client=client)


def test_internal_fields_are_not_part_of_the_input_schema() -> None:
    app = compile_apr_graph(settings=AprSettings(base_url="http://127.0.0.1:9/v1"))
    assert set(app.get_input_jsonschema()["properties"]) == {"task", "context"}


def test_importing_the_package_does_not_import_the_chat_model_stack() -> None:
    code = (
        "import sys, apr_graph; print('langchain_core.language_models.chat_models' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
