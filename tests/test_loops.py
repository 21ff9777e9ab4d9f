"""Which event loop runs a request: an async run's requests run on its caller's loop, in its
thread; a sync run's on the client's one helper loop; connections stay with their loop and go
when it does; limits are the client's, whatever loops share it."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from apr_graph import LLMClient, compile_apr_graph
from apr_graph.openai_transport import OpenAITransport
from apr_graph.responses import Completion, StreamProgress
from apr_graph.retry import CallBudget
from apr_graph.settings import AprSettings
from apr_graph.testing import Reply, Rule
from apr_graph.transport import ChatRequest, TextRequest
from tests.conftest import ServerFactory, settings_for
from tests.test_lifecycle import merging_server

Q = [{"role": "user", "content": "q"}]


class Recording:
    """An ``OpenAITransport`` that notes the thread and loop each request was sent from."""

    def __init__(self, settings: AprSettings) -> None:
        self.inner = OpenAITransport(settings)
        self.seen: list[tuple[int, asyncio.AbstractEventLoop]] = []
        self.name = self.inner.name

    async def chat(
        self, request: ChatRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        self.seen.append((threading.get_ident(), asyncio.get_running_loop()))
        return await self.inner.chat(request, progress=progress, budget=budget)

    async def complete(
        self, request: TextRequest, *, progress: StreamProgress, budget: CallBudget | None
    ) -> Completion:
        return await self.inner.complete(request, progress=progress, budget=budget)

    async def list_models(self) -> list[str]:
        return await self.inner.list_models()

    async def capacity(self) -> int:
        return await self.inner.capacity()

    def capacity_report(self) -> dict[str, Any]:
        return self.inner.capacity_report()

    def concurrency_limit(self) -> int:
        return self.inner.concurrency_limit()

    async def aclose(self) -> None:
        await self.inner.aclose()


def recording(make_server: ServerFactory) -> tuple[AprSettings, Recording]:
    """Settings for a merging server, and a transport that records where each call ran."""
    settings = settings_for(merging_server(make_server))
    return settings, Recording(settings)


async def test_an_async_run_sends_every_request_from_its_callers_loop_and_thread(
    make_server: ServerFactory,
) -> None:
    settings, transport = recording(make_server)
    async with LLMClient(settings, transport=transport) as client:
        result = await compile_apr_graph(client=client).ainvoke({"task": "two parts"})
    assert result["answer"] == "merged"
    assert len(transport.seen) == 4  # plan, two threads, merge
    here = (threading.get_ident(), asyncio.get_running_loop())
    assert set(transport.seen) == {here}
    assert not [t for t in threading.enumerate() if t.name == "apr-graph"]  # no helper loop


async def test_a_sync_run_uses_one_helper_loop_and_an_async_run_then_uses_its_own(
    make_server: ServerFactory,
) -> None:
    settings, transport = recording(make_server)
    async with LLMClient(settings, transport=transport) as client:
        app = compile_apr_graph(client=client)
        # invoke() from a worker thread, then from this loop's own thread (which it blocks)
        assert (await asyncio.to_thread(app.invoke, {"task": "two parts"}))["answer"] == "merged"
        assert app.invoke({"task": "two parts"})["answer"] == "merged"
        sync_runs, transport.seen = transport.seen, []
        assert (await app.ainvoke({"task": "two parts"}))["answer"] == "merged"
    helpers = {thread for thread, _ in sync_runs}
    assert len(sync_runs) == 8
    assert len(helpers) == 1
    assert threading.get_ident() not in helpers
    assert set(transport.seen) == {(threading.get_ident(), asyncio.get_running_loop())}


def _established_to(port: int) -> int:
    """Open TCP connections of this machine to ``port`` on the loopback (client sides)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("needs Linux's /proc/net/tcp")
    rows = [line.split() for line in table.read_text().splitlines()[1:]]
    return sum(int(row[2].split(":")[1], 16) == port and row[3] == "01" for row in rows)


def test_two_asyncio_runs_of_one_graph_both_finish_and_leave_no_connection_open(
    make_server: ServerFactory,
) -> None:
    server = merging_server(make_server)
    port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
    app = compile_apr_graph(settings=settings_for(server))
    for _ in range(2):
        assert asyncio.run(app.ainvoke({"task": "two parts"}))["answer"] == "merged"
        # its loop has shut down, and with it the connections it pooled
        assert _established_to(port) == 0
    probes = [r.path for r in server.requests if r.method == "GET"]
    assert sorted(probes) == ["/metrics", "/props", "/slots", "/v1/models"]  # once, not per loop


def test_the_concurrency_limit_holds_across_loops_in_several_threads(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=Reply(content="one two three", chunk_delay_s=0.05))])
    settings = settings_for(server, max_concurrency=1, probe_capacity=False)
    transport = Recording(settings)
    client = LLMClient(settings, transport=transport)
    answers: list[str] = []

    def ask() -> None:
        async def two() -> list[Completion]:
            return list(await asyncio.gather(*(client.chat(Q, role="worker") for _ in range(2))))

        answers.extend(c.text for c in asyncio.run(two()))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert answers == ["one two three"] * 6
    senders = sorted(thread for thread, _ in transport.seen)
    assert senders == sorted(
        t.ident or 0 for t in threads for _ in range(2)
    )  # each on its own loop
    spans = sorted((r.started_at, r.ended_at or time.monotonic()) for r in server.chat_requests())
    overlaps = [a for a, b in itertools.pairwise(spans) if b[0] < a[1] - 0.01]
    assert overlaps == []  # one request in flight at a time, whatever loop sent it


def test_closing_a_client_while_a_loop_it_used_is_idle_closes_that_loops_connections(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server([Rule(reply=Reply(content="fine"))])
    port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
    client = LLMClient(settings_for(server, probe_capacity=False))
    with asyncio.Runner() as runner:
        assert runner.run(client.chat(Q, role="worker")).text == "fine"
        assert _established_to(port) == 1  # kept alive on that loop, which now idles
        client.close()  # closed on that loop when it next runs: here, at its shutdown
    assert _established_to(port) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
