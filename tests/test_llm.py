"""The client on its own: parsing helpers and structured output."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from apr_graph import (
    AprSettings,
    LLMClient,
    ModelCallError,
    ModelNotFoundError,
    ServerUnreachableError,
    StructuredOutputError,
)
from apr_graph.responses import extract_json, strip_reasoning
from apr_graph.testing import Reply, Rule
from tests.conftest import ServerFactory, settings_for


class Answer(BaseModel):
    value: int


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('Here you go: {"a": {"b": [1, 2]}} hope it helps', {"a": {"b": [1, 2]}}),
    ],
)
def test_extract_json(text: str, expected: object) -> None:
    assert extract_json(text) == expected


def test_extract_json_without_object() -> None:
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json("no json here")


def test_strip_reasoning() -> None:
    assert strip_reasoning("<think>a\nb</think>\nanswer") == "answer"
    assert strip_reasoning("<think>never closed") == ""
    assert strip_reasoning("plain") == "plain"


async def test_structured_gives_up_with_the_history(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=Reply(content="nope"))])
    client = LLMClient(settings_for(server, max_repairs=1, structured_output="json_schema"))
    with pytest.raises(StructuredOutputError) as info:
        await client.structured([{"role": "system", "content": "s"}], Answer, role="planner")
    assert info.value.attempts == 2
    assert info.value.last_response == "nope"
    assert len(server.chat_requests()) == 2


async def test_structured_returns_validated_value_and_usage(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=Reply(content={"value": 7}))])
    client = LLMClient(settings_for(server))
    value, completion = await client.structured(
        [{"role": "system", "content": "s"}], Answer, role="planner"
    )
    assert value == Answer(value=7)
    assert completion.mode == "json_schema"
    assert completion.completion_tokens == 2
    assert completion.requests == 1


async def test_cached_tokens_are_read_from_usage_details(make_server: ServerFactory) -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    server = make_server([Rule(reply=Reply(content="x", usage=usage))])
    completion = await LLMClient(settings_for(server)).chat(
        [{"role": "user", "content": "q"}], role="worker"
    )
    assert completion.cached_tokens == 8


async def test_unknown_model_is_not_retried(make_server: ServerFactory) -> None:
    server = make_server([], models=["real-model"], strict_models=True)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        await LLMClient(settings_for(server, model="typo")).chat(
            [{"role": "user", "content": "q"}], role="worker"
        )
    assert len(server.chat_requests()) == 1


async def test_unreachable_server(make_server: ServerFactory) -> None:
    server = make_server([])
    url = server.base_url
    server.stop()
    client = LLMClient(AprSettings(base_url=url, max_retries=1, retry_max_wait_s=0.05))
    with pytest.raises(ServerUnreachableError, match=r"cannot connect to http://127\.0\.0\.1"):
        await client.chat([{"role": "user", "content": "q"}], role="worker")


async def test_hung_server_times_out(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=Reply(content="late", delay_s=2))])
    client = LLMClient(settings_for(server, request_timeout_s=0.3, max_retries=0))
    with pytest.raises(ModelCallError, match=r"timed out after 0\.3s") as info:
        await client.chat([{"role": "user", "content": "q"}], role="worker")
    assert type(info.value) is ModelCallError  # a timeout is not "unreachable"
    assert info.value.attempts == 1
