"""The one HTTP stack (aiohttp): what goes on the wire, and the errors a caller sees (the SDK's
classes, read by the one retry policy)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from pydantic import ValidationError

from apr_graph import (
    AprSettings,
    AuthenticationError,
    LLMClient,
    ModelCallError,
    ServerUnreachableError,
    compile_apr_graph,
)
from apr_graph.testing import Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory, settings_for

Q = [{"role": "user", "content": "q"}]


async def test_a_streamed_call_sends_the_sdk_headers_and_a_streaming_body(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=Reply(content="one two three"))])
    settings = settings_for(server, api_key="sk-test-key")
    async with LLMClient(settings) as client:
        answer = await client.chat(Q, role="worker", max_tokens=50)
    assert answer.text == "one two three"
    (request,) = server.chat_requests()
    assert request.headers["authorization"] == "Bearer sk-test-key"
    assert request.headers["user-agent"].startswith("AsyncOpenAI/Python")
    assert not [name for name in request.headers if name.startswith("x-apr")]
    assert request.headers["content-type"] == "application/json"
    assert request.body is not None
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["messages"] == Q
    assert request.body["max_tokens"] == 50


def own_headers(server: ScriptedServer) -> list[str]:
    """The ``X-Apr-*`` headers of every request ``server`` received (none should have any)."""
    return [name for r in server.requests for name in r.headers if name.startswith("x-apr")]


async def test_a_run_sends_no_header_of_its_own_and_roles_still_route(
    make_server: ServerFactory,
) -> None:
    plan = {"strategy": "parallel", "merge": "synthesize", "subtasks": ["red", "green", "blue"]}
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", reply=lambda r: Reply(content=r.last_user_message.split()[2])),
            Rule(role="synthesizer", reply=lambda r: Reply(content="merged " + r.all_text[-60:])),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    out = await app.ainvoke({"task": "Name three colours."})
    assert out["answer"].startswith("merged")
    assert sorted(t["answer"] for t in out["threads"]) == ["blue", "green", "red"]
    posts = [r for r in server.requests if r.method == "POST"]
    routed = {
        role: len(server.chat_requests(role)) for role in ("planner", "worker", "synthesizer")
    }
    assert routed == {"planner": 1, "worker": 3, "synthesizer": 1}
    assert len(posts) == sum(routed.values())
    assert own_headers(server) == []


async def test_unstreamed_and_text_completions_send_no_header_of_their_own(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=Reply(content="fine"))])
    async with LLMClient(settings_for(server)) as client:
        await client.chat(Q, role="worker", stream=False)
        await client.complete("Q:", role="native", stop=["\n"], max_tokens=8)
    assert sorted(r.path for r in server.requests if r.method == "POST") == [
        "/v1/chat/completions",
        "/v1/completions",
    ]
    assert own_headers(server) == []


async def test_a_refused_key_is_the_sdk_error_after_one_request(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=Reply(status=401, error_message="bad key"))])
    async with LLMClient(settings_for(server)) as client:
        with pytest.raises(AuthenticationError, match="bad key"):
            await client.chat(Q, role="worker")
    assert len(server.chat_requests()) == 1


async def test_a_rate_limit_is_retried(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(reply=Reply(status=429, headers={"Retry-After": "0"}), times=1),
            Rule(reply=Reply(content="fine")),
        ]
    )
    async with LLMClient(settings_for(server)) as client:
        answer = await client.chat(Q, role="worker")
    assert answer.text == "fine"
    assert answer.requests == 2


async def test_a_closed_port_is_unreachable_not_a_timeout(make_server: ServerFactory) -> None:
    server = make_server([])
    url = server.base_url
    server.stop()
    settings = AprSettings(base_url=url, max_retries=1, retry_max_wait_s=0.05)
    async with LLMClient(settings) as client:
        with pytest.raises(ServerUnreachableError, match="cannot connect"):
            await client.chat(Q, role="worker")


async def test_a_silent_server_times_out(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=Reply(content="late", delay_s=2))])
    settings = settings_for(server, request_timeout_s=0.3, max_retries=0)
    async with LLMClient(settings) as client:
        with pytest.raises(ModelCallError, match=r"timed out after 0\.3s"):
            await client.chat(Q, role="worker")


def test_asking_for_httpx_is_refused_saying_what_to_do() -> None:
    with pytest.raises(ValidationError, match="drop the setting"):
        AprSettings(base_url="http://127.0.0.1:9/v1", http_client="httpx")
    assert AprSettings(http_client="aiohttp").http_client == "aiohttp"  # still accepted


async def test_the_environment_proxy_carries_the_stream(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = make_server([Rule(reply=Reply(content="via the proxy"))])
    monkeypatch.setenv("HTTP_PROXY", proxy.base_url.rsplit("/v1", 1)[0])
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    settings = AprSettings(
        base_url="http://api.example.invalid/v1",
        max_retries=0,
        probe_capacity=False,
    )
    async with LLMClient(settings) as client:
        answer = await client.chat(Q, role="worker", max_tokens=5)
    assert answer.text == "via the proxy"
    (request,) = proxy.chat_requests()
    assert request.path == "http://api.example.invalid/v1/chat/completions"


async def test_a_stream_cut_mid_way_is_retried(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(reply=Reply(content="one two three four", cut_stream_after=2), times=1),
            Rule(reply=Reply(content="whole answer")),
        ]
    )
    async with LLMClient(settings_for(server)) as client:
        answer = await client.chat(Q, role="worker")
    assert answer.text == "whole answer"
    assert answer.requests == 2
    assert len(server.chat_requests()) == 2


async def test_streamed_requests_one_after_another_reuse_one_connection(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=Reply(content="again"))])
    async with LLMClient(settings_for(server)) as client:
        for _ in range(3):
            assert (await client.chat(Q, role="worker")).text == "again"
    peers = {r.peer for r in server.chat_requests()}
    assert len(server.chat_requests()) == 3
    assert len(peers) == 1, peers  # kept alive, not opened again per request


async def test_a_body_left_open_after_done_still_answers_at_once() -> None:
    # A server that sends [DONE] and then neither ends the body nor closes the connection:
    # the answer is complete; reading on for the body's end must not cost it (nor 120 s).
    chunk = {"choices": [{"index": 0, "delta": {"content": "complete"}, "finish_reason": "stop"}]}
    events = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + f"{len(events):x}\r\n".encode()
            + events
            + b"\r\n"
        )
        await writer.drain()
        held.append(writer)  # the terminating chunk never comes

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = AprSettings(
        base_url=f"http://127.0.0.1:{port}/v1",
        max_retries=0,
        probe_capacity=False,
        request_timeout_s=30,
    )
    try:
        async with LLMClient(settings) as client:
            started = time.monotonic()
            answer = await client.chat(Q, role="worker")
        assert answer.text == "complete"
        assert time.monotonic() - started < 2
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
