"""What LiteLLM 1.108.7 and ``transformers serve`` 5.25.0 did to apr (issue 34), through the
public API against the doubles that answer as they do: an empty key, the width notice, a
wildcard route's catalogue, a dead backend's multi-line 500, and a dropped
``response_format`` answered with JSON that fails the schema."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

import pytest
from pydantic import BaseModel, model_validator

from apr_graph import LLMClient, ModelNotFoundError, compile_apr_graph
from apr_graph.cli_view import LiveView
from apr_graph.responses import StreamProgress
from apr_graph.testing import (
    LiteLLMProxy,
    LlamaCpp,
    RecordedRequest,
    Reply,
    Rule,
    TransformersServe,
)
from tests.conftest import CliRunner, ServerFactory, eventually, settings_for
from tests.test_real_servers import DIRECT, HUB_MODEL, QUESTION, SCHEMA_INSTRUCTION, fan_out_rules


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def posts(server: Any) -> list[RecordedRequest]:
    return [r for r in server.requests if r.method == "POST"]


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's retries, short: one retry, waits under a second."""
    monkeypatch.setenv("APR_MAX_RETRIES", "1")
    monkeypatch.setenv("APR_RETRY_MAX_WAIT_S", "0.2")


# -- 1. an empty key ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_key_runs_on_a_keyless_server(
    make_server: ServerFactory, run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    server = make_server(
        [Rule(reply=Reply(content=DIRECT))], models=[HUB_MODEL], personality=TransformersServe()
    )
    key = ["--api-key="] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("OPENAI_API_KEY", "")
    run = run_cli("ask", "-q", *key, "--base-url", server.base_url, "--model", HUB_MODEL, "t")
    assert (run.code, run.out.strip()) == (0, "4"), run.err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_key_to_a_proxy_that_wants_one_is_a_key_error_in_one_line(
    make_server: ServerFactory,
    run_cli: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    fast_retries: None,
    how: str,
) -> None:
    # LiteLLM answers a request without a key with a plain-text 500, which says nothing of
    # keys: apr must send something it can refuse as a key.
    server = make_server(
        [Rule(reply=Reply(content=DIRECT))], api_key="sk-master", personality=LiteLLMProxy()
    )
    key = ["--api-key="] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("OPENAI_API_KEY", "")
    run = run_cli("ask", "-q", *key, "--base-url", server.base_url, "--model", "test-model", "t")
    assert run.code == 5, run.err
    assert len(error_lines(run.err)) == 1, run.err
    assert "API key" in run.err
    refused = [r for r in server.requests if r.status == 400]
    assert len(refused) == 1  # a refused key is never retried
    assert refused[0].headers["authorization"] == "Bearer not-needed"


# -- 2. the width notice -----------------------------------------------------------------------


def test_a_server_that_does_not_report_its_width_gets_one_line_saying_so(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = make_server(fan_out_rules(), personality=LiteLLMProxy())
    common = ("--base-url", server.base_url, "--model", "test-model", "--max-concurrency", "3")
    run = run_cli("ask", *common, "t")
    assert run.code == 0, run.err
    said = [line for line in run.err.splitlines() if "does not report" in line]
    assert len(said) == 1, run.err
    assert re.search(r"\b3\b", said[0])
    for quiet in (("-q",), ("--json",)):
        run = run_cli("ask", *quiet, *common, "t")
        assert run.code == 0, run.err
        assert "does not report" not in run.err


def test_the_live_table_prints_a_notice_above_itself(capsys: pytest.CaptureFixture[str]) -> None:
    view = LiveView()  # what a terminal gets (not started: nothing but the line is drawn)
    view.on_event({"event": "notice", "text": "apr: the server\ndoes not report its width"})
    assert capsys.readouterr().err == "apr: the server does not report its width\n"


# -- 3. a wildcard route's catalogue -----------------------------------------------------------


def test_a_wildcard_proxy_runs_a_name_its_catalogue_does_not_list(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    server = make_server(
        [Rule(reply=Reply(content=DIRECT))],
        models=[],
        api_key="sk-master",
        personality=LiteLLMProxy(wildcard=True),
    )
    url = server.base_url
    run = run_cli("ask", "-q", "--api-key", "sk-master", "--base-url", url, "--model", "qwen", "t")
    assert (run.code, run.out.strip()) == (0, "4"), run.err[:500]
    assert {r.body["model"] for r in posts(server) if r.body} == {"qwen"}


def test_a_name_the_proxy_refuses_is_exit_6_with_a_short_list(
    make_server: ServerFactory, run_cli: CliRunner
) -> None:
    offered = [f"model-{i:03d}" for i in range(212)]
    server = make_server(
        [Rule(reply=Reply(content=DIRECT))], models=offered, personality=LiteLLMProxy()
    )
    run = run_cli("ask", "-q", "--base-url", server.base_url, "--model", "qwen", "t")
    assert run.code == 6, run.err
    (line,) = error_lines(run.err)
    assert "'qwen'" in line
    assert "model-004" in line
    assert "model-005" not in line
    assert "207 more" in line
    assert len(line) < 600


async def test_a_pinned_transformers_serve_refuses_another_name_as_unknown(
    make_server: ServerFactory,
) -> None:
    server = make_server([], models=[HUB_MODEL], personality=TransformersServe())
    async with LLMClient(settings_for(server, model="qwen")) as client:
        with pytest.raises(ModelNotFoundError, match="pinned"):
            await client.chat(QUESTION, role="worker")
    assert len(posts(server)) == 1


# -- 4. a dead backend behind the proxy --------------------------------------------------------


def test_a_dead_backend_behind_the_proxy_is_one_line(
    make_server: ServerFactory, run_cli: CliRunner, fast_retries: None
) -> None:
    server = make_server(
        [Rule(reply=Reply(content=DIRECT))], personality=LiteLLMProxy(backend_down=True)
    )
    run = run_cli("ask", "-q", "--base-url", server.base_url, "--model", "test-model", "t")
    assert run.code == 1, run.err
    (line,) = error_lines(run.err)
    assert "HTTP 500" in line
    assert "Connection error" in line
    assert "  " not in line.split("HTTP 500", 1)[1]  # the blank lines are gone, not spaced out
    assert len(posts(server)) >= 2  # a 500 is still worth a retry


# -- 5. a dropped response_format, answered with JSON that fails the schema --------------------


class Answer(BaseModel):
    value: int


def fenced_json_unless_schema_in_prompt(good: dict[str, Any], bad: dict[str, Any]) -> Rule:
    """A model behind a server that drops ``response_format``: fenced JSON of its own shape,
    the schema's shape only when the schema is in the prompt."""

    def reply(request: RecordedRequest) -> Reply:
        if SCHEMA_INSTRUCTION in request.all_text:
            return Reply(content=good)
        return Reply(content=f"Here you go:\n```json\n{json.dumps(bad)}\n```")

    return Rule(reply=reply)


async def test_json_that_fails_the_schema_falls_back_to_the_schema_in_the_prompt(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [fenced_json_unless_schema_in_prompt({"value": 4}, {"answer": "four"})],
        models=[HUB_MODEL],
        personality=TransformersServe(),
    )
    async with LLMClient(settings_for(server, model=HUB_MODEL)) as client:
        value, completion = await client.structured(QUESTION, Answer, role="planner")
    assert value == Answer(value=4)
    assert completion.mode == "prompt"
    first, second = posts(server)
    assert (first.body or {})["response_format"]["type"] == "json_schema"
    assert "response_format" not in (second.body or {})
    assert SCHEMA_INSTRUCTION in second.all_text


THREE = (
    "Answer three questions: (1) What is the capital of Australia? (2) Which gas do plants "
    "take in for photosynthesis? (3) What is 17 times 23?"
)


async def test_a_plan_the_loose_type_takes_but_the_schema_forbids_means_the_schema_was_ignored(
    make_server: ServerFactory,
) -> None:
    # What transformers serve 5.25.0 and the 1.5B model did: no merge, the goals spelled out
    # where the schema sent lists the labels. The plan type takes it; the schema does not.
    loose = {
        "strategy": "parallel",
        "subtasks": [
            "What is the capital of Australia?",
            "Which gas do plants take in for photosynthesis?",
            "What is 17 times 23?",
        ],
    }
    strict = {"strategy": "parallel", "merge": "concat", "subtasks": ["(1)", "(2)", "(3)"]}
    planner = fenced_json_unless_schema_in_prompt(strict, loose)
    server = make_server(
        [
            Rule(role="planner", reply=planner.reply),
            Rule(role="worker", reply=Reply(content="part answered")),
        ],
        models=[HUB_MODEL],
        personality=TransformersServe(),
    )
    app = compile_apr_graph(settings=settings_for(server, model=HUB_MODEL))
    result = await app.ainvoke({"task": THREE})

    plan = result["plan"]
    assert plan["merge"] == "concat"
    assert [s["goal"] for s in plan["subtasks"]] == [
        "(1) What is the capital of Australia?",
        "(2) Which gas do plants take in for photosynthesis?",
        "(3) What is 17 times 23?",
    ]
    planner_calls = [c for c in result["calls"] if c["role"] == "planner"]
    assert [c["mode"] for c in planner_calls] == ["prompt"]
    first, second = (r for r in posts(server) if r.role == "planner")
    assert (first.body or {})["response_format"]["type"] == "json_schema"
    assert SCHEMA_INSTRUCTION in second.all_text


async def test_a_run_on_transformers_serve_records_the_mode_that_worked(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [fenced_json_unless_schema_in_prompt(DIRECT, {"plan": ["think", "answer"]})],
        models=[HUB_MODEL],
        personality=TransformersServe(),
    )
    app = compile_apr_graph(settings=settings_for(server, model=HUB_MODEL))
    result = await app.ainvoke({"task": "What is 2 + 2?"})
    assert result["answer"] == "4"
    planner = [c for c in result["calls"] if c["role"] == "planner"]
    assert [c["mode"] for c in planner] == ["prompt"]


async def test_json_cut_off_at_the_limit_is_re_asked_in_the_same_mode(
    make_server: ServerFactory,
) -> None:
    # A reply cut at max_tokens says nothing about the format: it is asked afresh, not a
    # reason to drop constrained decoding.
    server = make_server(
        [
            Rule(reply=Reply(content='{"val', finish_reason="length"), times=1),
            Rule(reply=Reply(content={"value": 4})),
        ]
    )
    async with LLMClient(settings_for(server)) as client:
        value, completion = await client.structured(QUESTION, Answer, role="planner")
    assert value == Answer(value=4)
    assert completion.mode == "json_schema"
    assert all((r.body or {}).get("response_format") for r in posts(server))


class Even(BaseModel):
    value: int

    @model_validator(mode="after")
    def _even(self) -> Even:
        if self.value % 2:
            raise ValueError("value must be even")
        return self


async def test_json_that_breaks_only_the_models_own_rules_is_re_asked_in_the_same_mode(
    make_server: ServerFactory,
) -> None:
    # A rule no JSON schema states is not enforced by constrained decoding either: breaking
    # it says nothing about the server, so the model is shown its error, schema mode kept.
    server = make_server(
        [
            Rule(reply=Reply(content={"value": 3}), times=1),
            Rule(reply=Reply(content={"value": 4})),
        ]
    )
    async with LLMClient(settings_for(server)) as client:
        value, completion = await client.structured(QUESTION, Even, role="planner")
    assert value == Even(value=4)
    assert completion.mode == "json_schema"
    second = posts(server)[1]
    assert (second.body or {})["response_format"]["type"] == "json_schema"
    assert "value must be even" in second.all_text


@pytest.mark.parametrize("labels", [[], ["1", "2", "3"]])
def test_the_schema_in_the_prompt_comes_with_examples_that_fit_it(labels: list[str]) -> None:
    # A 1.5B model shown only the schema copied it back three times (transformers serve);
    # with an object of each allowed shape beside it, it wrote a plan.
    from jsonschema import Draft202012Validator

    from apr_graph.plan_schema import plan_json_schema
    from apr_graph.structured import schema_instruction

    schema = plan_json_schema(4, labels)
    text = schema_instruction(schema)
    assert SCHEMA_INSTRUCTION in text
    examples = [json.loads(line) for line in text.split("one per line:\n", 1)[1].splitlines()]
    assert [e["strategy"] for e in examples] == ["direct", "parallel"]
    for example in examples:
        assert Draft202012Validator(schema).is_valid(example), example


@pytest.mark.parametrize(
    ("persona", "waits"), [(LlamaCpp(n_ctx=8192, total_slots=4), True), (None, False)]
)
async def test_after_a_stream_is_closed_mid_reply_llama_cpp_is_given_a_moment_to_free_its_slot(
    make_server: ServerFactory, persona: LlamaCpp | None, waits: bool
) -> None:
    # llama.cpp frees the slot of a closed stream at its next token: a request sent before
    # that lands on another slot and reads its whole prompt again (seen: 31 s instead of 2.6).
    slow = Reply(content=" ".join(f"w{i}" for i in range(400)), chunk_delay_s=0.01)
    server = make_server(
        [Rule(reply=slow, times=1), Rule(reply=Reply(content="ok"))], personality=persona
    )
    messages = [{"role": "user", "content": "Write a long list."}]
    async with LLMClient(settings_for(server)) as client:
        progress = StreamProgress()
        cut = asyncio.create_task(client.chat(messages, role="worker", progress=progress))
        await eventually(lambda: progress.completion_tokens >= 5, "the first tokens")
        cut.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cut
        closed = time.monotonic()
        await client.chat(messages, role="worker")
        _, again = server.chat_requests()
    gap = again.started_at - closed
    assert (gap >= 0.25) is waits, gap
    assert gap < 1.0
