"""Real servers without surprises (issue 12), through the public API against personalities:
LiteLLM's wrong-key 400, llama.cpp's context and ``--jinja`` errors, ``transformers serve``
ignoring ``response_format``, slow machines, capacity a user can see, names and URLs."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest
from langchain_core.tools import tool
from pydantic import BaseModel

from apr_graph import (
    AuthenticationError,
    ContextOverflowError,
    LLMClient,
    ModelCallError,
    ServerCapabilityError,
    compile_apr_graph,
)
from apr_graph.testing import (
    VLLM,
    LiteLLMProxy,
    LlamaCpp,
    Personality,
    RecordedRequest,
    Reply,
    Rule,
    ScriptedServer,
    TransformersServe,
)
from apr_graph.testing.script import Pacer
from tests.conftest import CliRunner, ServerFactory, settings_for, stop_promptly
from tests.test_graph import echo_worker, merge_synth, parallel_plan

HUB_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
GGUF_ALIAS = "qwen2.5-7b-instruct-q4_k_m"
DIRECT = {"strategy": "direct", "answer": "4"}
SCHEMA_INSTRUCTION = "validates against this JSON schema"
QUESTION = [{"role": "system", "content": "Give the value."}, {"role": "user", "content": "q"}]


class Answer(BaseModel):
    value: int


def posts(server: ScriptedServer) -> list[RecordedRequest]:
    """Every completion request the server received (probes are GETs)."""
    return [r for r in server.requests if r.method == "POST"]


def assert_says_one_request(error: Exception) -> None:
    message = str(error)
    assert "1 request" in message
    assert "1 requests" not in message
    assert "1 attempts" not in message


def litellm_with_master_key(make_server: ServerFactory, **persona: Any) -> ScriptedServer:
    rules = [Rule(reply=Reply(content={"value": 1}))]
    return make_server(rules, api_key="sk-master", personality=LiteLLMProxy(**persona))


# -- 1. LiteLLM proxy, wrong key ----------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["400-no-db", "401-legacy"])
async def test_litellm_wrong_key_fails_a_chat_after_one_request(
    make_server: ServerFactory, legacy: bool
) -> None:
    server = litellm_with_master_key(make_server, legacy_auth_errors=legacy)
    async with LLMClient(settings_for(server, api_key="sk-wrong")) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.chat(QUESTION, role="worker")
    assert info.value.attempts == 1
    assert len(posts(server)) == 1
    assert re.search(r"refused the (API )?key", str(info.value))
    assert_says_one_request(info.value)


async def test_litellm_wrong_key_fails_a_structured_call_without_a_mode_cascade(
    make_server: ServerFactory,
) -> None:
    server = litellm_with_master_key(make_server)
    async with LLMClient(settings_for(server, api_key="sk-wrong")) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.structured(QUESTION, Answer, role="planner")
    assert info.value.attempts == 1
    assert len(posts(server)) == 1  # no second try in json_object or prompt mode
    assert posts(server)[0].body["response_format"]["type"] == "json_schema"
    assert re.search(r"refused the (API )?key", str(info.value))
    assert_says_one_request(info.value)


async def test_litellm_wrong_key_fails_a_run_after_one_request(
    make_server: ServerFactory,
) -> None:
    server = litellm_with_master_key(make_server)
    app = compile_apr_graph(settings=settings_for(server, api_key="sk-wrong"))
    with pytest.raises(AuthenticationError) as info:
        await app.ainvoke({"task": "anything"})
    assert info.value.attempts == 1
    assert len(posts(server)) == 1
    assert_says_one_request(info.value)


# -- 2. llama.cpp, oversized prompt ---------------------------------------------------------------

LONG = [{"role": "user", "content": "word " * 80}]  # 80 tokens: more than n_ctx=50


def assert_advises(error: Exception) -> None:
    message = str(error)
    assert re.search(r"short", message)
    assert "larger context" in message
    assert "max_tokens" in message


async def test_llama_cpp_context_overflow_is_one_request_with_advice(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=Reply(content="x"))], personality=LlamaCpp(n_ctx=50))
    async with LLMClient(settings_for(server)) as client:
        with pytest.raises(ContextOverflowError) as info:
            await client.chat(LONG, role="worker")
    assert info.value.attempts == 1
    assert len(posts(server)) == 1
    assert_advises(info.value)
    assert (info.value.requested_tokens or 0) >= 50  # the server's own count (n_ctx is 50)


async def test_llama_cpp_context_overflow_keeps_the_structured_mode(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=Reply(content={"value": 7}))], personality=LlamaCpp(n_ctx=50))
    async with LLMClient(settings_for(server)) as client:
        with pytest.raises(ContextOverflowError) as info:
            await client.structured(LONG, Answer, role="planner")
        assert len(posts(server)) == 1  # an overflow is not a refused response_format
        assert_advises(info.value)
        value, _ = await client.structured(QUESTION, Answer, role="planner")
    assert value == Answer(value=7)
    assert len(posts(server)) == 2
    assert posts(server)[1].body["response_format"]["type"] == "json_schema"


# -- 3. transformers serve ignores response_format --------------------------------------------


def prose_unless_schema_in_prompt(json_reply: dict[str, Any]) -> Rule:
    """A model behind a server that ignores ``response_format``: JSON only when asked in words."""

    def reply(request: RecordedRequest) -> Reply:
        if SCHEMA_INSTRUCTION in request.all_text:
            return Reply(content=json_reply)
        return Reply(content="Sure! The answer you are looking for is four.")

    return Rule(reply=reply)


def transformers_server(make_server: ServerFactory, json_reply: dict[str, Any]) -> ScriptedServer:
    return make_server(
        [prose_unless_schema_in_prompt(json_reply)],
        models=[HUB_MODEL],
        personality=TransformersServe(),
    )


async def test_transformers_serve_falls_back_to_the_schema_in_the_prompt_and_remembers(
    make_server: ServerFactory,
) -> None:
    server = transformers_server(make_server, {"value": 4})
    async with LLMClient(settings_for(server, model=HUB_MODEL)) as client:
        value, completion = await client.structured(QUESTION, Answer, role="planner")
        assert value == Answer(value=4)
        assert completion.mode == "prompt"
        first_call = len(posts(server))
        assert "response_format" not in posts(server)[-1].body
        again, completion = await client.structured(QUESTION, Answer, role="planner")
    assert again == Answer(value=4)
    assert completion.mode == "prompt"
    second_call = posts(server)[first_call:]
    assert len(second_call) == 1  # straight to prompt mode
    assert "response_format" not in second_call[0].body
    assert SCHEMA_INSTRUCTION in second_call[0].all_text


async def test_transformers_serve_run_plans_in_prompt_mode(make_server: ServerFactory) -> None:
    server = transformers_server(make_server, DIRECT)
    app = compile_apr_graph(settings=settings_for(server, model=HUB_MODEL))
    result = await app.ainvoke({"task": "What is 2 + 2?"})
    assert result["answer"] == "4"
    planner = [c for c in result["calls"] if c["role"] == "planner"]
    assert [c["mode"] for c in planner] == ["prompt"]


async def test_a_400_that_does_not_name_the_format_is_not_a_format_refusal(
    make_server: ServerFactory,
) -> None:
    refusal = Reply(status=400, error_message="messages must alternate between user and assistant")
    server = make_server([Rule(reply=refusal)])
    async with LLMClient(settings_for(server)) as client:
        with pytest.raises(ModelCallError, match="must alternate") as info:
            await client.structured(QUESTION, Answer, role="planner")
    assert len(posts(server)) == 1  # no second try with another mode
    assert info.value.attempts == 1


# -- 4. slow machines ----------------------------------------------------------------------------


async def test_every_call_is_streamed_planner_merge_and_judge_included(
    make_server: ServerFactory,
) -> None:
    judge = Rule(
        role="synthesizer",
        where=lambda r: "response_format" in (r.body or {}) or SCHEMA_INSTRUCTION in r.all_text,
        reply=Reply(content={"best": "s1", "reason": "first"}),
    )
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(2))),
            echo_worker(),
            judge,
            merge_synth(),
        ]
    )
    merged = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    judged = await compile_apr_graph(settings=settings_for(server, merge="best")).ainvoke(
        {"task": "t"}
    )
    assert {c["role"] for c in merged["calls"]} >= {"planner", "worker", "synthesizer"}
    assert "judge" in {c["role"] for c in judged["calls"]}
    requests = posts(server)
    assert len(requests) == 8  # per run: planner, two threads, a merge or a judge
    assert [r.role for r in requests if r.body.get("stream") is not True] == []


async def test_a_steady_stream_outlasts_the_request_timeout(make_server: ServerFactory) -> None:
    words = " ".join(f"w{i}" for i in range(20))
    server = make_server([Rule(reply=Reply(content=words, chunk_delay_s=0.05))])  # ~1 s
    settings = settings_for(server, request_timeout_s=0.5, max_retries=0)
    async with LLMClient(settings) as client:
        completion = await client.chat(QUESTION, role="worker", stream=True)
    assert completion.text == words
    assert len(posts(server)) == 1


@pytest.mark.parametrize(
    "silence",
    [Reply(content="late", delay_s=1.0), Reply(content="a b c", chunk_delay_s=1.0)],
    ids=["before-headers", "mid-stream"],
)
async def test_a_silent_server_times_out(make_server: ServerFactory, silence: Reply) -> None:
    server = make_server([Rule(reply=silence)])
    settings = settings_for(server, request_timeout_s=0.3, max_retries=0)
    async with LLMClient(settings) as client:
        with pytest.raises(ModelCallError, match="timed out"):
            await client.chat(QUESTION, role="worker", stream=True)


class _StallsAfter(ScriptedServer):
    """Streams its first ``tokens`` pieces 50 ms apart, then goes silent for ``silence_s``
    (the pieces arrive after the headers, so what watches the silence is the body's own
    timeout, not the one armed while the headers were awaited)."""

    def __init__(self, rules: list[Rule], *, tokens: int, silence_s: float) -> None:
        super().__init__(rules)
        self.tokens, self.silence_s = tokens, silence_s

    def pace(self, request: RecordedRequest, reply: Reply) -> Pacer:
        server = self

        class Stall(Pacer):
            def wait(self, tokens: int) -> None:
                time.sleep(0.05 if tokens <= server.tokens else 0)
                if tokens == server.tokens + 1:
                    time.sleep(server.silence_s)

        return Stall()


@pytest.mark.parametrize(("silence_s", "times_out"), [(1.5, True), (0.15, False)])
async def test_silence_mid_body_after_some_tokens_times_out_and_shorter_gaps_do_not(
    silence_s: float, times_out: bool
) -> None:
    # The body's read timeout is watched lazily (not re-armed per piece of data): a silence
    # that follows streamed tokens is caught within 1-1.25 timeouts; a shorter one is not one.
    words = "one two three four five six"
    server = _StallsAfter([Rule(reply=Reply(content=words))], tokens=3, silence_s=silence_s)
    server.start()
    try:
        settings = settings_for(server, request_timeout_s=0.4, max_retries=0)
        async with LLMClient(settings) as client:
            started = time.perf_counter()
            if times_out:
                with pytest.raises(ModelCallError, match=r"timed out after 0\.4s"):
                    await client.chat(QUESTION, role="worker", stream=True)
                assert 0.5 < time.perf_counter() - started < 1.2  # 0.15 s of tokens first
            else:
                completion = await client.chat(QUESTION, role="worker", stream=True)
                assert completion.text == words
    finally:
        stop_promptly([server])


async def test_a_reply_cut_at_the_token_limit_is_never_pasted_back(
    make_server: ServerFactory,
) -> None:
    cut = '{"value": 7, "note": "CUT-OFF-MARKER and then the budget ran'
    server = make_server(
        [
            Rule(reply=Reply(content=cut, finish_reason="length"), times=1),
            Rule(reply=Reply(content={"value": 7})),
        ]
    )
    async with LLMClient(settings_for(server)) as client:
        value, _ = await client.structured(QUESTION, Answer, role="planner")
    assert value == Answer(value=7)
    _, second = posts(server)
    assert "CUT-OFF-MARKER" not in json.dumps(second.messages)


# -- 5. capacity you can see ---------------------------------------------------------------------


async def run_and_collect(app: Any, task: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's final state and its custom events."""
    state: dict[str, Any] = {}
    events: list[dict[str, Any]] = []
    async for mode, chunk in app.astream({"task": task}, stream_mode=["custom", "values"]):
        if mode == "custom":
            events.append(chunk)
        else:
            state = chunk
    return state, events


def fan_out_rules() -> list[Rule]:
    planner = Rule(role="planner", reply=Reply(content=parallel_plan(2)))
    return [planner, echo_worker(), merge_synth()]


def assert_capacity_shape(capacity: Any) -> None:
    assert isinstance(capacity, dict)
    assert {"width", "source", "limit"} <= set(capacity)
    assert capacity["width"] is None or isinstance(capacity["width"], int)
    assert isinstance(capacity["source"], str)
    assert isinstance(capacity["limit"], int)


async def test_llama_cpp_capacity_is_read_from_props(make_server: ServerFactory) -> None:
    server = make_server(fan_out_rules(), personality=LlamaCpp(total_slots=4))
    result, events = await run_and_collect(compile_apr_graph(settings=settings_for(server)), "t")
    capacity = result["metrics"]["capacity"]
    assert_capacity_shape(capacity)
    assert capacity["width"] == 4
    assert "/props" in capacity["source"]
    assert capacity["limit"] == 4
    assert [e for e in events if e["event"] == "notice"] == []  # nothing to warn about


async def test_litellm_capacity_is_unknown_and_the_run_says_so_once(
    make_server: ServerFactory,
) -> None:
    server = make_server(fan_out_rules(), personality=LiteLLMProxy())
    app = compile_apr_graph(settings=settings_for(server, max_concurrency=3))
    result, events = await run_and_collect(app, "t")
    capacity = result["metrics"]["capacity"]
    assert_capacity_shape(capacity)
    assert capacity["width"] is None
    assert re.search(r"n[o']t report", capacity["source"])
    assert capacity["limit"] == 3
    notices = [e for e in events if e["event"] == "notice"]
    assert len(notices) == 1
    assert re.search(r"unknown|n[o']t report", notices[0]["text"])
    assert re.search(r"\b3\b", notices[0]["text"])  # how many requests go out at once


async def test_vllm_capacity_is_unknown_but_its_kv_cache_is_reported(
    make_server: ServerFactory,
) -> None:
    persona = VLLM(num_gpu_blocks=1000, block_size=16, max_num_seqs=64)
    server = make_server(fan_out_rules(), personality=persona)
    result, _ = await run_and_collect(compile_apr_graph(settings=settings_for(server)), "t")
    capacity = result["metrics"]["capacity"]
    assert_capacity_shape(capacity)
    assert capacity["width"] is None  # max_num_seqs is nowhere in vLLM's /metrics
    assert capacity["kv_cache_tokens"] == 1000 * 16


def test_apr_ask_json_has_the_calls_and_the_capacity(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = make_server(fan_out_rules(), personality=LlamaCpp(total_slots=2))
    url = server.base_url
    run = run_cli("ask", "--json", "-q", "--base-url", url, "--model", "test-model", "t")
    assert run.code == 0, run.err
    output = json.loads(run.out)
    assert isinstance(output["calls"], list)
    assert {c["role"] for c in output["calls"]} >= {"planner", "worker", "synthesizer"}
    assert_capacity_shape(output["metrics"]["capacity"])
    assert output["metrics"]["capacity"]["width"] == 2


# -- 6. a server that cannot do tools ------------------------------------------------------------


@tool
def lookup(term: str) -> str:
    """Look a term up."""
    return f"definition of {term}"


async def test_tools_on_llama_cpp_without_jinja_fail_the_run_once(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(4))),
            Rule(role="worker", reply=Reply(content="never reached with tools")),
            merge_synth(),
        ],
        personality=LlamaCpp(jinja=False),
    )
    app = compile_apr_graph(settings=settings_for(server), tools=[lookup])
    with pytest.raises(ServerCapabilityError, match="--jinja"):
        await app.ainvoke({"task": "four parts"})
    with_tools = [r for r in posts(server) if (r.body or {}).get("tools")]
    asked = [json.dumps(r.messages) for r in with_tools]
    assert len(asked) == len(set(asked))  # no tool-carrying request was sent twice
    assert 1 <= len(with_tools) <= 4
    assert len(server.chat_requests("planner")) == 1


# -- 7. names and URLs ---------------------------------------------------------------------------


def test_an_unknown_model_exits_6_listing_the_offered_names(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    offered = [HUB_MODEL, "qwen-small"]
    server = make_server([Rule(reply=Reply(content=DIRECT))], models=offered, personality=VLLM())
    run = run_cli("ask", "-q", "--base-url", server.base_url, "--model", "nonexistent", "t")
    assert run.code == 6
    assert HUB_MODEL in run.err
    assert "qwen-small" in run.err


def test_a_server_that_ignores_model_names_runs_with_one_warning(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = make_server(
        [Rule(reply=Reply(content=DIRECT))], models=[GGUF_ALIAS], personality=LlamaCpp()
    )
    run = run_cli("ask", "-q", "--base-url", server.base_url, "--model", "nonexistent", "t")
    assert run.code == 0, run.err
    assert run.out.strip() == "4"
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err
    assert re.search(r"ignor|serves", lines[0])
    assert GGUF_ALIAS in lines[0] or "nonexistent" in lines[0]


def test_a_base_url_without_v1_says_to_add_it(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = make_server([Rule(reply=Reply(content=DIRECT))], personality=VLLM())
    root = server.base_url.removesuffix("/v1")
    run = run_cli("ask", "-q", "--base-url", root, "--model", "test-model", "t")
    assert run.code in {4, 6}
    assert re.search(r"add(ing)? .*/v1", run.err), run.err


@pytest.mark.parametrize("persona", [VLLM(), TransformersServe()], ids=["vllm", "transformers"])
def test_fastapi_servers_have_their_routes_under_v1_only(
    make_server: ServerFactory, persona: Personality
) -> None:
    server = make_server([Rule(reply=Reply(content="x"))], personality=persona)
    body = {"model": "test-model", "messages": [{"role": "user", "content": "q"}]}
    with httpx.Client(base_url=server.base_url.removesuffix("/v1")) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert http.get("/v1/models").status_code == 200
        missing = http.post("/chat/completions", json=body)
        assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
        assert http.get("/models").status_code == 404
