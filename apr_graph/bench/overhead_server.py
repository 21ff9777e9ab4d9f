"""The server of the overhead measurement, run in a process of its own so that the CPU time
measured is the client's alone.

It answers every request at once, as a server with enough slots would: one event loop
(``aiohttp.web``), a streamed reply's chunks paced by timers, no thread per connection. The
test server (``ScriptedServer``) runs a thread per connection, which at hundreds of
concurrent streams spends the machine's cores on switching between them, cores the client
measured here shares. The bodies are the test server's own (``apr_graph.testing.wire``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from apr_graph.state import SubtaskRecord
from apr_graph.testing import RecordedRequest, Reply, wire

__all__ = ["CHUNKS", "REPLY_S", "TASK", "serve_forever", "subtask"]

CHUNKS = 5
CHUNK_S = 0.1
REPLY_S = CHUNKS * CHUNK_S
TASK = "fan out {n}"


def _plan(request: RecordedRequest) -> Reply:
    """The plan of the fan-out, as the plan schema has a model write it: the goals alone."""
    found = re.search(r"fan out (\d+)", request.all_text)
    count = int(found.group(1)) if found else 1
    goals = [subtask(i)["goal"] for i in range(1, count + 1)]
    return Reply(content={"strategy": "parallel", "merge": "synthesize", "subtasks": goals})


def subtask(index: int) -> SubtaskRecord:
    """The ``index``-th subtask of the fan-out (from 1), as apr-graph reads it from the plan."""
    return SubtaskRecord(
        id=f"s{index}", goal=f"part {index}", depends_on=[], fork=False, max_tokens=None
    )


def reply_for(request: RecordedRequest, reply_s: float, chunks: int = CHUNKS) -> Reply:
    """The reply to ``request``: the plan of its fan-out, the merge, or a worker's answer of
    ``chunks`` words streamed over ``reply_s`` seconds."""
    if request.role == "planner":
        return _plan(request)
    if request.role == "synthesizer":
        return Reply(content="merged")
    # Every chunk a word of its own: one word over and over is a loop, which apr-graph stops.
    words = " ".join(f"ok{i}" for i in range(chunks))
    return Reply(content=words, chunk_delay_s=reply_s / chunks)


def serve_forever(reply_s: float = REPLY_S, chunks: int = CHUNKS) -> None:
    """The overhead server (run in its own process): prints its URL, serves until killed.
    A worker's reply is ``chunks`` words (one streamed chunk each) over ``reply_s`` seconds."""
    asyncio.run(_serve(reply_s, chunks))


async def _serve(reply_s: float, chunks: int) -> None:
    from aiohttp import web

    async def chat(http: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in http.headers.items()}
        body = json.loads(await http.read())
        request = RecordedRequest("POST", http.path, headers, body, time.monotonic())
        reply = reply_for(request, reply_s, chunks)
        payload = wire.completion(request, reply)
        if not body.get("stream"):
            return web.json_response(payload)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(http)
        base = wire.stream_base(payload, False)
        events = [
            wire.sse_event(wire.delta_chunk(base, piece, False))
            for piece in wire.stream_pieces(reply.text())
        ]
        if reply.chunk_delay_s:
            for event in events:
                await asyncio.sleep(reply.chunk_delay_s)
                await response.write(event)
            events = []
        events += wire.stream_end(request, base, reply, payload["usage"], False)
        await response.write(b"".join(events))
        await response.write_eof()
        return response

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"http://{host}:{port}/v1", flush=True)
    await asyncio.Event().wait()
