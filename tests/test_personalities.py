"""Server personalities answer like the real servers: status codes, bodies, routes, quirks.

These test the scripted servers themselves over loopback HTTP, not the apr client.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

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
from apr_graph.testing.simulated import LatencyModel, SimulatedServer

HUB_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


def chat(content: str = "hello", **fields: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {"model": "anything", "messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start servers with a personality; yield an ``httpx`` client on each server's root."""
    started: list[tuple[ScriptedServer, httpx.Client]] = []

    def factory(
        personality: Personality, content: str = "scripted answer", **kwargs: Any
    ) -> tuple[ScriptedServer, httpx.Client]:
        rules = [Rule(reply=Reply(content=content))]
        server = ScriptedServer(rules, personality=personality, **kwargs).start()
        client = httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=10)
        started.append((server, client))
        return server, client

    yield factory
    for server, client in started:
        client.close()
        server.stop()


# -- llama.cpp -------------------------------------------------------------------------------


def test_llama_cpp_serves_any_model_name_and_lists_its_alias(serve: Any) -> None:
    _, client = serve(LlamaCpp(), models=["qwen2.5-1.5b-instruct-q4_k_m"])
    reply = client.post("/v1/chat/completions", json=chat(model="gpt-4o"))
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "scripted answer"
    listing = client.get("/v1/models").json()
    assert [m["id"] for m in listing["data"]] == ["qwen2.5-1.5b-instruct-q4_k_m"]
    assert listing["data"][0]["owned_by"] == "llamacpp"


def test_llama_cpp_props_slots_and_health(serve: Any) -> None:
    _, client = serve(LlamaCpp(n_ctx=2048, total_slots=4))
    props = client.get("/props").json()
    assert props["total_slots"] == 4
    assert props["default_generation_settings"]["n_ctx"] == 2048
    slots = client.get("/slots").json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3]
    assert {s["n_ctx"] for s in slots} == {2048}
    assert client.get("/health").json() == {"status": "ok"}


def test_llama_cpp_refuses_a_prompt_that_does_not_fit_a_slot(serve: Any) -> None:
    server, client = serve(LlamaCpp(n_ctx=2048))
    too_long = client.post("/v1/chat/completions", json=chat(" ".join(["w"] * 2097)))
    assert too_long.status_code == 400
    assert too_long.json() == {
        "error": {
            "code": 400,
            "message": "request (2097 tokens) exceeds the available context size "
            "(2048 tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 2097,
            "n_ctx": 2048,
        }
    }
    exactly = client.post("/v1/chat/completions", json=chat(" ".join(["w"] * 2048)))
    assert exactly.status_code == 400  # llama.cpp refuses n_tokens >= n_ctx
    fits = client.post("/v1/chat/completions", json=chat(" ".join(["w"] * 2047)))
    assert fits.status_code == 200
    assert len(server.chat_requests()) == 3


def test_llama_cpp_without_jinja_refuses_tools_with_a_500(serve: Any) -> None:
    _, client = serve(LlamaCpp(jinja=False))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    reply = client.post("/v1/chat/completions", json=chat(tools=[tool]))
    assert reply.status_code == 500
    message = "tools param requires --jinja flag"
    assert reply.json() == {"error": {"code": 500, "message": message, "type": "server_error"}}
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200


def test_llama_cpp_timings_count_the_cached_prefix(serve: Any) -> None:
    _, client = serve(LlamaCpp())
    prompt = " ".join(f"w{i}" for i in range(40))
    first = client.post("/v1/chat/completions", json=chat(prompt)).json()["timings"]
    second = client.post("/v1/chat/completions", json=chat(prompt + " more")).json()["timings"]
    assert first["cache_n"] == 0
    assert first["prompt_n"] == 40
    assert second["cache_n"] == 40
    assert second["prompt_n"] == 1
    assert second["predicted_n"] == 2


def test_llama_cpp_streams_timings_on_the_last_chunk(serve: Any) -> None:
    _, client = serve(LlamaCpp())
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as reply:
        events = [line for line in reply.iter_lines() if line.startswith("data: {")]
    assert '"timings"' in events[-1]
    assert '"finish_reason": "stop"' in events[-1]


def test_llama_cpp_metrics_need_the_flag(serve: Any) -> None:
    _, client = serve(LlamaCpp())
    off = client.get("/metrics")
    assert off.status_code == 501
    assert off.json()["error"]["type"] == "not_supported_error"
    assert "Start it with `--metrics`" in off.json()["error"]["message"]
    _, client = serve(LlamaCpp(metrics=True))
    client.post("/v1/chat/completions", json=chat("one two three"))
    text = client.get("/metrics").text
    assert "# TYPE llamacpp:prompt_tokens_total counter" in text
    assert "llamacpp:prompt_tokens_total 3\n" in text


def test_llama_cpp_key_errors_and_unknown_paths(serve: Any) -> None:
    _, client = serve(LlamaCpp(), api_key="secret")
    refused = client.post("/v1/chat/completions", json=chat())
    assert refused.status_code == 401
    assert refused.json() == {
        "error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}
    }
    assert client.get("/health").status_code == 200  # public
    assert client.get("/v1/models").status_code == 200  # public
    headers = {"Authorization": "Bearer secret"}
    assert client.post("/v1/chat/completions", json=chat(), headers=headers).status_code == 200
    missing = client.get("/nope", headers=headers)
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "code": 404,
        "message": "File Not Found",
        "type": "not_found_error",
    }


# -- LiteLLM proxy -----------------------------------------------------------------------------


def sse_events(reply: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a streamed reply, in order."""
    return [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]


def test_litellm_without_a_database_answers_a_wrong_key_with_400(serve: Any) -> None:
    _, client = serve(LiteLLMProxy(), api_key="sk-master", models=["anything"])
    wrong = client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 400
    assert wrong.json() == {
        "error": {
            "message": "Authentication Error, No connected db.",
            "type": "auth_error",
            "param": "None",
            "code": "400",
        }
    }


@pytest.mark.parametrize("header", [None, "sk-master", "Basic sk-master"])
def test_litellm_answers_a_missing_key_with_a_plain_text_500(
    serve: Any, header: str | None
) -> None:
    _, client = serve(LiteLLMProxy(), api_key="sk-master", models=["anything"])
    headers = {} if header is None else {"Authorization": header}
    reply = client.post("/v1/chat/completions", json=chat(), headers=headers)
    assert reply.status_code == 500
    assert reply.text == "Internal Server Error"
    assert reply.headers["content-type"].startswith("text/plain")


def test_litellm_legacy_releases_said_authentication_error(serve: Any) -> None:
    _, client = serve(LiteLLMProxy(legacy_auth_errors=True), api_key="sk-master")
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer sk-other"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"] == "Authentication Error, No connected db."
    assert wrong.json()["error"]["type"] == "auth_error"


def test_litellm_refuses_a_model_no_entry_routes_with_400(serve: Any) -> None:
    _, client = serve(LiteLLMProxy(), api_key="sk-master", models=["gpt-4o-mini"])
    headers = {"Authorization": "Bearer sk-master"}
    served = client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"), headers=headers)
    assert served.status_code == 200
    other = client.post("/v1/chat/completions", json=chat(model="qwen"), headers=headers)
    assert other.status_code == 400
    assert other.json()["error"] == {
        "message": "/chat/completions: Invalid model name passed in model=qwen. "
        "Call `/v1/models` to view available models for your key.",
        "type": "invalid_request_error",
        "param": None,
        "code": "400",
    }
    listing = client.get("/v1/models", headers=headers).json()
    assert [m["id"] for m in listing["data"]] == ["gpt-4o-mini"]
    assert client.get("/health/liveliness").json() == "I'm alive!"


def test_litellm_wildcard_forwards_any_model_and_lists_a_catalogue(serve: Any) -> None:
    _, client = serve(LiteLLMProxy(wildcard=True), api_key="sk-master", models=[])
    headers = {"Authorization": "Bearer sk-master"}
    for model in ("gpt-4o-mini", "qwen", "whatever/else"):
        reply = client.post("/v1/chat/completions", json=chat(model=model), headers=headers)
        assert reply.status_code == 200
    names = [m["id"] for m in client.get("/v1/models", headers=headers).json()["data"]]
    assert len(names) == len(set(names)) == 212
    assert "qwen" not in names


def test_litellm_dead_backend_is_a_500_over_several_lines(serve: Any) -> None:
    _, client = serve(LiteLLMProxy(backend_down=True))
    reply = client.post("/v1/chat/completions", json=chat(model="test-model"))
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "internal_server_error"
    assert error["code"] == "500"
    assert "\n\n" in error["message"]


def test_litellm_streams_usage_with_an_empty_delta_and_done(serve: Any) -> None:
    _, client = serve(LiteLLMProxy(), content="two words")
    body = chat(model="test-model", stream=True, stream_options={"include_usage": True})
    events = sse_events(client.post("/v1/chat/completions", json=body))
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [{"index": 0, "delta": {}}]
    assert usage["usage"]["completion_tokens"] == 2


def test_litellm_has_no_props_slots_or_metrics(serve: Any) -> None:
    _, client = serve(LiteLLMProxy(), api_key="sk-master")
    for path in ("/props", "/slots", "/metrics"):
        reply = client.get(path, headers={"Authorization": "Bearer wrong"})
        assert reply.status_code == 404
        assert reply.json() == {"detail": "Not Found"}


def test_litellm_error_codes_are_strings(serve: Any) -> None:
    server = ScriptedServer(
        [Rule(reply=Reply(status=429, error_message="slow down"))], personality=LiteLLMProxy()
    )
    with server, httpx.Client(base_url=server.base_url) as client:
        reply = client.post("/chat/completions", json=chat(model="test-model"))
    assert reply.status_code == 429
    assert reply.json()["error"]["code"] == "429"
    assert reply.json()["error"]["message"] == "slow down"


# -- transformers serve -----------------------------------------------------------------------


def test_transformers_serve_drops_response_format(serve: Any) -> None:
    _, client = serve(TransformersServe(), content="Sure! Here is prose.", models=[HUB_MODEL])
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    reply = client.post("/v1/chat/completions", json=chat(model=HUB_MODEL, response_format=schema))
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "Sure! Here is prose."
    assert reply.json()["model"] == HUB_MODEL  # 5.25.0: no @main


def test_transformers_serve_streams_usage_and_no_done(serve: Any) -> None:
    _, client = serve(TransformersServe(), content="two words", models=[HUB_MODEL])
    body = chat(model=HUB_MODEL, stream=True, stream_options={"include_usage": True})
    events = sse_events(client.post("/v1/chat/completions", json=body))
    assert "[DONE]" not in events
    usage = json.loads(events[-1])
    assert usage["usage"]["completion_tokens"] == 2
    assert usage["model"] == HUB_MODEL


def test_transformers_serve_has_no_props_slots_or_metrics(serve: Any) -> None:
    _, client = serve(TransformersServe(), models=[HUB_MODEL])
    for path in ("/props", "/slots", "/metrics"):
        reply = client.get(path)
        assert reply.status_code == 404
        assert reply.json() == {"detail": "Not Found"}
    assert client.get("/health").json() == {"status": "ok"}
    listing = client.get("/v1/models").json()
    (card,) = listing["data"]
    assert card["id"] == HUB_MODEL
    assert (card["object"], card["owned_by"], card["created"]) == ("model", "local", 0)
    assert isinstance(card["status"], dict)


def test_transformers_serve_answers_only_its_model(serve: Any) -> None:
    _, pinned = serve(TransformersServe(), models=[HUB_MODEL])
    assert pinned.post("/v1/chat/completions", json=chat(model=HUB_MODEL)).status_code == 200
    other = pinned.post("/v1/chat/completions", json=chat(model="test-model"))
    assert other.status_code == 400
    assert other.json() == {"detail": f"Server is pinned to '{HUB_MODEL}'; requested 'test-model'."}
    _, loading = serve(TransformersServe(force_model=False), models=[HUB_MODEL])
    missing = loading.post("/v1/chat/completions", json=chat(model="test-model"))
    assert missing.status_code == 500
    assert missing.text == "Internal Server Error"
    revision = loading.post("/v1/chat/completions", json=chat(model=f"{HUB_MODEL}@main"))
    assert revision.status_code == 200


def test_transformers_serve_refuses_unknown_fields(serve: Any) -> None:
    _, client = serve(TransformersServe(), models=[HUB_MODEL])
    reply = client.post("/v1/chat/completions", json=chat(model=HUB_MODEL, cache_prompt=True))
    assert reply.status_code == 422
    assert reply.json() == {"detail": "Unexpected fields in the request: {'cache_prompt'}"}


# -- vLLM ------------------------------------------------------------------------------------


def test_vllm_unknown_model_is_a_404(serve: Any) -> None:
    _, client = serve(VLLM(), models=[HUB_MODEL])
    reply = client.post("/v1/chat/completions", json=chat(model="x"))
    assert reply.status_code == 404
    assert reply.json() == {
        "error": {
            "message": "The model `x` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    _, old = serve(VLLM(flat_errors=True), models=[HUB_MODEL])
    assert old.post("/v1/chat/completions", json=chat(model="x")).json() == {
        "object": "error",
        "message": "The model `x` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


def test_vllm_lists_the_served_model(serve: Any) -> None:
    _, client = serve(VLLM(max_model_len=8192), models=[HUB_MODEL])
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == HUB_MODEL
    assert card["owned_by"] == "vllm"
    assert card["root"] == HUB_MODEL
    assert card["max_model_len"] == 8192
    assert client.get("/props").json() == {"detail": "Not Found"}


def test_vllm_accepts_json_schema_and_reports_cached_tokens(serve: Any) -> None:
    persona = VLLM(enable_prompt_tokens_details=True)
    _, client = serve(persona, content={"answer": 4}, models=[HUB_MODEL])
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    prompt = " ".join(f"w{i}" for i in range(100))
    body = chat(prompt, model=HUB_MODEL, response_format=schema)
    first = client.post("/v1/chat/completions", json=body)
    second = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200
    assert first.json()["choices"][0]["message"]["content"] == '{"answer": 4}'
    assert first.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 96}


def test_vllm_refuses_a_prompt_longer_than_the_context(serve: Any) -> None:
    _, client = serve(VLLM(max_model_len=100), models=[HUB_MODEL])
    reply = client.post("/v1/chat/completions", json=chat(" ".join(["w"] * 120), model=HUB_MODEL))
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "BadRequestError"
    assert reply.json()["error"]["message"].startswith(
        "This model's maximum context length is 100 tokens. However, your request has 120"
    )
    budget = client.post("/v1/chat/completions", json=chat("a b", model=HUB_MODEL, max_tokens=99))
    assert budget.status_code == 400
    assert budget.json()["error"]["param"] == "max_tokens"


def test_vllm_metrics_show_running_and_waiting_but_not_max_num_seqs(serve: Any) -> None:
    gate = threading.Event()

    def held(request: RecordedRequest) -> Reply:
        gate.wait(10)  # each request stays in flight until the metrics are read
        return Reply(content="slow")

    server = ScriptedServer(
        [Rule(reply=held)],
        models=[HUB_MODEL],
        personality=VLLM(max_num_seqs=2, num_gpu_blocks=2048),
    )
    with server, httpx.Client(base_url=server.base_url.removesuffix("/v1")) as client:
        senders = [
            threading.Thread(
                target=client.post,
                args=("/v1/chat/completions",),
                kwargs={"json": chat(model=HUB_MODEL)},
            )
            for _ in range(3)
        ]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 5
        while len(server.in_flight()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        text = client.get("/metrics").text
        gate.set()
        for sender in senders:
            sender.join()
    labels = f'{{engine="0",model_name="{HUB_MODEL}"}}'
    assert f"vllm:num_requests_running{labels} 2.0" in text
    assert f"vllm:num_requests_waiting{labels} 1.0" in text
    (info,) = re.findall(r"^vllm:cache_config_info\{(.*)\} 1\.0$", text, re.M)
    assert 'block_size="16",cache_dtype="auto"' in info
    assert 'enable_prefix_caching="True"' in info
    assert 'num_gpu_blocks="2048"' in info
    assert "max_num_seqs" not in text


def test_vllm_key_guards_only_v1(serve: Any) -> None:
    _, client = serve(VLLM(), api_key="token", models=[HUB_MODEL])
    refused = client.post("/v1/chat/completions", json=chat(model=HUB_MODEL))
    assert refused.status_code == 401
    assert refused.json() == {"error": "Unauthorized"}
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_a_simulated_server_takes_a_personality() -> None:
    server = SimulatedServer(
        lambda request: Reply(content="fast"),
        latency=LatencyModel(step_s=0.001),
        models=[HUB_MODEL],
        personality=VLLM(),
    )
    with server, httpx.Client(base_url=server.base_url) as client:
        assert client.post("/chat/completions", json=chat(model=HUB_MODEL)).status_code == 200
        assert client.post("/chat/completions", json=chat(model="x")).status_code == 404
