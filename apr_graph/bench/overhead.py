"""Framework overhead: client CPU time, wall time and memory per thread, against a bare
async HTTP request (plain ``httpx``, no SDK, no graph) sent to the same server in the same run.

The server runs in a separate process, so the CPU time measured here is the client's alone.
Its replies have no model latency: everything measured is the cost of orchestration.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from apr_graph.graph import compile_apr_graph
from apr_graph.llm import LLMClient
from apr_graph.settings import AprSettings
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer

__all__ = ["measure_overhead", "serve_forever"]

CONCURRENCY = 64


def _plan(request: RecordedRequest) -> Reply:
    found = re.search(r"fan out (\d+)", request.all_text)
    count = int(found.group(1)) if found else 1
    subtasks = [{"id": f"s{i}", "goal": f"part {i}"} for i in range(count)]
    return Reply(content={"strategy": "parallel", "subtasks": subtasks})


def serve_forever() -> None:
    """The overhead server (run in its own process): prints its URL, serves until killed."""
    rules = [
        Rule(role="planner", reply=_plan),
        Rule(role="worker", reply=Reply(content="ok done")),
        Rule(role="synthesizer", reply=Reply(content="merged")),
        Rule(reply=Reply(content="ok done")),
    ]
    server = ScriptedServer(rules).start()
    server.requests = _Discard()  # keep no history: 1,000-thread runs would pile it up
    print(server.base_url, flush=True)
    while True:
        time.sleep(3600)


class _Discard(list[RecordedRequest]):
    def append(self, item: RecordedRequest) -> None:
        return None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _graph_run(base_url: str, threads: int) -> dict[str, float]:
    settings = AprSettings(
        base_url=base_url,
        model="m",
        max_threads=threads,
        max_total_threads=threads,
        max_concurrency=CONCURRENCY,
    )
    client = LLMClient(settings)
    app = compile_apr_graph(settings=settings, client=client)
    cpu, wall = time.process_time(), time.perf_counter()
    result = await app.ainvoke({"task": f"fan out {threads}"})
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await client.aclose()
    assert result["metrics"]["threads"] == threads, result["metrics"]
    return {"cpu_s": cpu, "wall_s": wall}


async def _bare_run(base_url: str, requests: int) -> dict[str, float]:
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "part"}],
        "max_tokens": 16,
    }
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as http:

        async def one() -> None:
            async with gate, http.stream("POST", "/chat/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    pass

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*[one() for _ in range(requests)])
        return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


async def measure_overhead(
    sizes: Sequence[int], *, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """One row per fan-out size: graph vs bare HTTP, per thread."""
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from apr_graph.bench.overhead import serve_forever; serve_forever()",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        base_url = (await server.stdout.readline()).decode().strip()
        await _bare_run(base_url, 8)  # warm up both paths (imports, connections)
        await _graph_run(base_url, 2)
        rows = []
        for size in sizes:
            before = _peak_rss_mb()
            graph = await _graph_run(base_url, size)
            peak = _peak_rss_mb()
            bare = await _bare_run(base_url, size + 2)  # the graph also plans and merges
            rows.append(
                {
                    "threads": size,
                    "graph_wall_s": round(graph["wall_s"], 3),
                    "graph_cpu_s": round(graph["cpu_s"], 3),
                    "graph_cpu_ms_per_thread": round(1000 * graph["cpu_s"] / size, 2),
                    "bare_cpu_ms_per_request": round(1000 * bare["cpu_s"] / (size + 2), 2),
                    "cpu_ratio": round(
                        (graph["cpu_s"] / (size + 2)) / max(bare["cpu_s"] / (size + 2), 1e-9), 2
                    ),
                    "peak_rss_growth_mb": round(peak - before, 1),
                }
            )
            if progress is not None:
                progress(f"overhead {size} threads")
        return rows
    finally:
        server.kill()
        await server.wait()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure_overhead([int(a) for a in sys.argv[1:]] or [1, 8]))))
