"""Framework overhead, layer by layer: client CPU per thread of a fan-out of N threads.

Each layer runs the same N streamed chat requests, with the same prompt bytes, against one
scripted server in its own process (so the CPU time measured is the client's alone):

- ``floor``: one asyncio connection per request, the HTTP/1.1 request written by hand, SSE
  lines parsed with ``json.loads``: what any client must spend;
- ``aiohttp``: plain ``aiohttp``, a fresh session per round, the SSE lines split from its
  byte stream and parsed with ``json.loads``: the floor of a client built on the well-kept
  HTTP library (apr-graph's bulk path is on it);
- ``httpx``: plain ``httpx``, a fresh pool per round (its pool scans every connection for
  every request, so this layer grows with N: it is not a floor);
- ``sdk``: ``AsyncOpenAI(...).chat.completions.create(stream=True)`` on the SDK's default
  httpx client; ``sdk_aiohttp``: the same on the SDK's aiohttp transport;
- ``langgraph_sdk``: a minimal LangGraph ``Send`` fan-out whose node makes the httpx SDK call;
- ``langgraph_aiohttp``: the same fan-out whose node makes the bare ``aiohttp`` request: the
  floor of any design with a ``Send`` (a checkpointed task) per thread;
- ``langgraph_batched``: the alternative that design rules out, one ``Send`` per
  ``BATCH`` threads (a task whose threads are checkpointed together, so a resume redoes the
  finished threads of an unfinished batch): what LangGraph's per-task cost is;
- ``apr``: apr-graph's ``ainvoke`` (plan, N threads, merge).

Every worker reply streams for about ``REPLY_S`` seconds, so the N requests really overlap;
``ideal_ratio`` is the ideal wall time (one reply; the plan and the merge are instant) over
apr-graph's, and ``floor_ideal_ratio`` the same for the floor: what the machine allows, since the
scripted server shares its cores with the client. ``apr_full_gcs``: how many full collections
of the garbage collector fell in apr-graph's rounds (each costs ~0.1 s in this process, so a
round with one costs ~0.4 ms more per thread at 256 threads).
"""

from __future__ import annotations

import asyncio
import gc
import json
import operator
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from statistics import median
from typing import Annotated, Any, TypedDict
from urllib.parse import urlsplit

import httpx
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from apr_graph.bench.overhead_server import CHUNKS, REPLY_S, TASK, serve_forever, subtask
from apr_graph.graph import compile_apr_graph
from apr_graph.prompts import worker_messages
from apr_graph.settings import AprSettings
from apr_graph.state import PlanRecord

__all__ = ["measure_overhead", "serve_forever"]


def _body(n: int) -> dict[str, Any]:
    """A worker request of an N-thread fan-out, byte for byte as apr-graph builds it."""
    subtasks = [subtask(i) for i in range(1, n + 1)]
    plan = PlanRecord(
        strategy="parallel", answer=None, subtasks=subtasks, merge="synthesize", notes=[]
    )
    return {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 1024,
        "temperature": 0.0,
        "messages": worker_messages(TASK.format(n=n), "", plan["merge"], subtasks[0]),
    }


async def _timed(run: Callable[[], Any]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    await run()
    return time.process_time() - cpu, time.perf_counter() - wall


async def _floor(url: str, n: int) -> tuple[float, float]:
    parts = urlsplit(url)
    payload = json.dumps(_body(n)).encode()
    head = (
        f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()

    async def one() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(head + payload)
        await writer.drain()
        async for line in reader:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                json.loads(line[6:])
        writer.close()

    return await _timed(lambda: asyncio.gather(*(one() for _ in range(n))))


BATCH = 16
"""Threads per ``Send`` of the ``langgraph_batched`` layer."""

_HEADERS = {"Content-Type": "application/json"}


async def _aiohttp_one(http: Any, url: str, payload: bytes) -> None:
    """One streamed request on a bare ``aiohttp`` session, its SSE lines parsed."""
    async with http.post(f"{url}/chat/completions", data=payload, headers=_HEADERS) as r:
        rest = b""
        async for chunk in r.content.iter_any():
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    json.loads(line[6:])


def _aiohttp_session() -> Any:
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def _aiohttp(url: str, n: int) -> tuple[float, float]:
    payload = json.dumps(_body(n)).encode()

    async def run() -> None:
        async with _aiohttp_session() as http:
            await asyncio.gather(*(_aiohttp_one(http, url, payload) for _ in range(n)))

    return await _timed(run)


async def _httpx(url: str, n: int) -> tuple[float, float]:
    payload = json.dumps(_body(n)).encode()
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:

            async def one() -> None:
                headers = {"content-type": "application/json"}
                async with http.stream(
                    "POST", "/chat/completions", content=payload, headers=headers
                ) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            json.loads(line[6:])

            await asyncio.gather(*(one() for _ in range(n)))

    return await _timed(run)


async def _sdk_calls(client: Any, body: dict[str, Any], n: int) -> None:
    async def one() -> None:
        stream = await client.chat.completions.create(**body)
        async for _ in stream:
            pass

    await asyncio.gather(*(one() for _ in range(n)))


def _sdk_client(url: str, n: int, *, aiohttp: bool = False) -> Any:
    import openai

    if aiohttp:
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(max_connections=0)  # 0: no cap
        http = openai.DefaultAioHttpClient(limits=limits)
    else:
        http = openai.DefaultAsyncHttpxClient(limits=openai.DEFAULT_CONNECTION_LIMITS)
    return openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, http_client=http)


async def _sdk(url: str, n: int, *, aiohttp: bool = False) -> tuple[float, float]:
    body = {k: v for k, v in _body(n).items()}
    client = _sdk_client(url, n, aiohttp=aiohttp)
    try:
        return await _timed(lambda: _sdk_calls(client, body, n))
    finally:
        await client.close()


async def _sdk_aiohttp(url: str, n: int) -> tuple[float, float]:
    return await _sdk(url, n, aiohttp=True)


class _Item(TypedDict):
    ids: list[int]


class _FanState(TypedDict, total=False):
    n: int
    done: Annotated[list[int], operator.add]


def _fan_out(
    one: Callable[[int], Coroutine[Any, Any, None]], n: int, *, batch: int = 1
) -> Callable[[], Coroutine[Any, Any, Any]]:
    """A minimal LangGraph fan-out of ``n`` threads, ``batch`` of them per ``Send``; each
    thread is ``one(i)``. Returns what runs it and checks every thread reported."""

    async def work(state: _Item) -> dict[str, list[int]]:
        await asyncio.gather(*(one(i) for i in state["ids"]))
        return {"done": state["ids"]}

    def sends(state: _FanState) -> list[Send]:
        ids = list(range(state["n"]))
        return [Send("work", {"ids": ids[i : i + batch]}) for i in range(0, len(ids), batch)]

    builder: StateGraph[_FanState, None, _FanState, _FanState] = StateGraph(_FanState)
    builder.add_node("work", work)  # a plain function: as apr-graph's nodes, no callback run
    builder.add_conditional_edges(START, sends)
    builder.add_edge("work", END)
    app = builder.compile()

    async def run() -> None:
        result = await app.ainvoke({"n": n})
        assert sorted(result["done"]) == list(range(n)), "a thread of the fan-out is missing"

    return run


async def _langgraph_sdk(url: str, n: int) -> tuple[float, float]:
    body = _body(n)
    client = _sdk_client(url, n)

    async def one(_: int) -> None:
        stream = await client.chat.completions.create(**body)
        async for _chunk in stream:
            pass

    try:
        return await _timed(_fan_out(one, n))
    finally:
        await client.close()


async def _langgraph_aiohttp(url: str, n: int, *, batch: int = 1) -> tuple[float, float]:
    payload = json.dumps(_body(n)).encode()
    http: list[Any] = []
    fan_out = _fan_out(lambda _: _aiohttp_one(http[0], url, payload), n, batch=batch)

    async def run() -> None:
        async with _aiohttp_session() as session:
            http.append(session)
            await fan_out()

    return await _timed(run)


async def _langgraph_batched(url: str, n: int) -> tuple[float, float]:
    return await _langgraph_aiohttp(url, n, batch=BATCH)


async def _apr(url: str, n: int) -> tuple[float, float]:
    settings = AprSettings(
        base_url=url,
        model="m",
        max_threads=n,
        max_total_threads=n,
        max_concurrency=min(n, 1024),
        probe_capacity=False,
        # The fan-out's client cost is measured, not the decision: forked as planned.
        router=False,
        learn_speed=False,
        prefer="quality",
    )
    app = compile_apr_graph(settings=settings)
    result: dict[str, Any] = {}

    async def run() -> None:
        result.update(await app.ainvoke({"task": TASK.format(n=n)}))

    timing = await _timed(run)
    assert result["metrics"]["threads"] == n, result["metrics"]
    return timing


LAYERS = {
    "floor": _floor,
    "aiohttp": _aiohttp,
    "httpx": _httpx,
    "sdk": _sdk,
    "sdk_aiohttp": _sdk_aiohttp,
    "langgraph_sdk": _langgraph_sdk,
    "langgraph_aiohttp": _langgraph_aiohttp,
    "langgraph_batched": _langgraph_batched,
    "apr": _apr,
}


async def measure_overhead(
    sizes: Sequence[int],
    *,
    progress: Callable[[str], None] | None = None,
    reply_s: float = REPLY_S,
    rounds: int = 3,
    collector: bool = True,
    chunks: int = CHUNKS,
) -> list[dict[str, Any]]:
    """One row per fan-out size: client CPU ms per thread of each layer, and wall times.

    ``reply_s``: how long each worker reply streams (shorter only for quick checks: the
    requests of a large fan-out must overlap for the figures to mean anything).
    ``rounds``: each layer is measured this many times, the layers interleaved round by
    round, and the median reported (one run of a wide fan-out varies by tens of percent with
    when the garbage collector happens to run).
    ``chunks``: how many chunks (streamed tokens) a worker's reply has; with a long reply
    the figures per thread show what each streamed token costs (divide by ``chunks``).
    ``collector``: False measures with the garbage collector off (``gc.disable()``, restored
    after): the layers' own code, without the full collections that fall in some rounds only.
    """
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        # the server's module imports only the test server: the process starts in a blink
        "from apr_graph.bench.overhead_server import serve_forever; "
        f"serve_forever({reply_s!r}, {chunks!r})",
        stdout=asyncio.subprocess.PIPE,
    )
    was_enabled = gc.isenabled()
    if not collector:
        gc.disable()
    try:
        assert server.stdout is not None
        url = (await server.stdout.readline()).decode().strip()
        for layer in LAYERS.values():  # warm up every path (imports, first connections)
            await layer(url, 2)
        rows = []
        for size in sizes:
            row: dict[str, Any] = {
                "threads": size,
                "rounds": rounds,
                "gc": collector,
                "chunks": chunks,
            }
            timings: dict[str, list[tuple[float, float]]] = {name: [] for name in LAYERS}
            full_gcs = 0
            for done in range(1, rounds + 1):
                for name, layer in LAYERS.items():
                    before = gc.get_stats()[2]["collections"]
                    timings[name].append(await layer(url, size))
                    if name == "apr":
                        full_gcs += gc.get_stats()[2]["collections"] - before
                if progress is not None:
                    progress(f"overhead {size} threads, round {done}/{rounds}")
            for name, measured in timings.items():
                row[f"{name}_cpu_ms"] = round(1000 * median(c for c, _ in measured) / size, 2)
                row[f"{name}_wall_s"] = round(median(w for _, w in measured), 2)
            row["apr_vs_floor"] = round(row["apr_cpu_ms"] / max(row["floor_cpu_ms"], 1e-9), 2)
            row["apr_vs_aiohttp"] = round(row["apr_cpu_ms"] / max(row["aiohttp_cpu_ms"], 1e-9), 2)
            row["langgraph_vs_aiohttp"] = round(
                row["langgraph_aiohttp_cpu_ms"] / max(row["aiohttp_cpu_ms"], 1e-9), 2
            )
            row["apr_full_gcs"] = full_gcs
            row["ideal_ratio"] = round(reply_s / max(row["apr_wall_s"], 1e-9), 2)
            # What this machine allows: the floor's own ratio (the server shares its cores).
            row["floor_ideal_ratio"] = round(reply_s / max(row["floor_wall_s"], 1e-9), 2)
            rows.append(row)
        return rows
    finally:
        if was_enabled:
            gc.enable()
        server.kill()
        await server.wait()
