"""Model calls as LangChain sees a chat model's: ``stream_mode="messages"`` and tracers."""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import LLMResult

from apr_graph import compile_apr_graph
from apr_graph.callbacks import ModelRun, model_run
from apr_graph.testing import Reply, Rule
from apr_graph.transport import ChatRequest
from tests.conftest import ServerFactory, settings_for
from tests.test_graph import echo_server, echo_worker, merge_synth, parallel_plan


class Recorder(BaseCallbackHandler):
    """What a tracer sees: each chat-model run's start, tokens, end or error."""

    def __init__(self) -> None:
        self.starts: dict[UUID, tuple[list[BaseMessage], dict[str, Any], dict[str, Any]]] = {}
        self.tokens: dict[UUID, list[str]] = defaultdict(list)
        self.ends: dict[UUID, LLMResult] = {}
        self.errors: dict[UUID, BaseException] = {}
        self.prompts: dict[UUID, str] = {}

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.starts[run_id] = (messages[0], metadata or {}, kwargs.get("invocation_params", {}))

    def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> None:
        self.prompts[run_id] = prompts[0]

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        self.tokens[run_id].append(token)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self.ends[run_id] = response

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.errors[run_id] = error


async def test_stream_mode_messages_yields_every_call_as_message_chunks(
    make_server: ServerFactory,
) -> None:
    server = echo_server(make_server, 2)
    app = compile_apr_graph(settings=settings_for(server))

    texts: dict[str, list[str]] = defaultdict(list)
    where: dict[str, tuple[str, str]] = {}
    threads: dict[str, str | None] = {}
    async for chunk, meta in app.astream({"task": "t"}, stream_mode="messages"):
        assert isinstance(chunk, AIMessageChunk)
        assert chunk.id is not None
        texts[chunk.id].append(str(chunk.content))
        where[chunk.id] = (meta["langgraph_node"], meta["apr_role"])
        threads[chunk.id] = meta["apr_thread"]

    by_role = sorted((where[i][1], "".join(t)) for i, t in texts.items())
    assert [role for role, _ in by_role] == ["planner", "synthesizer", "worker", "worker"]
    assert sorted(text for role, text in by_role if role == "worker") == [
        "result(compute part 1)",
        "result(compute part 2)",
    ]
    assert dict(by_role)["synthesizer"] == "result(compute part 1) + result(compute part 2)"
    assert '"strategy"' in dict(by_role)["planner"]  # the plan's JSON, as it streamed
    assert {node for node, _ in where.values()} <= {"decompose", "worker", "synthesize"}
    assert len(texts) == len(server.chat_requests())
    # Interleaved streams of parallel threads are told apart by their subtask ids.
    by_thread = {threads[i]: "".join(t) for i, t in texts.items() if where[i][1] == "worker"}
    assert by_thread == {"s1": "result(compute part 1)", "s2": "result(compute part 2)"}
    assert {threads[i] for i in texts if where[i][1] != "worker"} == {None}


async def test_a_tracer_sees_each_request_its_messages_and_usage(
    make_server: ServerFactory,
) -> None:
    server = echo_server(make_server, 2)
    recorder = Recorder()
    app = compile_apr_graph(settings=settings_for(server))
    result = await app.ainvoke({"task": "t"}, config={"callbacks": [recorder]})

    assert len(recorder.starts) == len(recorder.ends) == len(server.chat_requests()) == 4
    assert not recorder.errors
    workers = [r for r, (_, meta, _) in recorder.starts.items() if meta["apr_role"] == "worker"]
    for run_id in workers:
        messages, meta, params = recorder.starts[run_id]
        assert messages[0].type == "system"
        assert "Subtask" in str(messages[-1].content)
        assert (meta["ls_model_name"], params["model"]) == ("test-model", "test-model")
        assert meta["langgraph_node"] in {"decompose", "worker"}  # sent early, or by its node
        message = recorder.ends[run_id].generations[0][0].message  # type: ignore[attr-defined]
        assert message.content.startswith("result(compute part")
        assert message.usage_metadata["output_tokens"] > 0
        assert "".join(recorder.tokens[run_id]) == message.content
    assert result["metrics"]["model_calls"] == 4


def test_sync_invoke_reports_too(make_server: ServerFactory) -> None:
    server = echo_server(make_server, 2)
    recorder = Recorder()
    app = compile_apr_graph(settings=settings_for(server))
    app.invoke({"task": "t"}, config={"callbacks": [recorder]})
    assert len(recorder.ends) == 4


async def test_a_failed_request_is_reported_as_an_error_then_its_retry(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(status=503, error_message="busy"), times=1),
            Rule(role="planner", reply=Reply(content={"strategy": "direct", "answer": "42"})),
        ]
    )
    recorder = Recorder()
    app = compile_apr_graph(settings=settings_for(server, retry_max_wait_s=0.1))
    result = await app.ainvoke({"task": "t"}, config={"callbacks": [recorder]})
    assert result["answer"] == "42"
    assert len(recorder.errors) == 1
    assert len(recorder.ends) == 1
    assert "503" in str(next(iter(recorder.errors.values())))


async def test_nothing_is_built_when_nothing_listens(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Outside a runnable, and in a run without handlers: no report (one context lookup).
    request = ChatRequest(messages=[], model="m", role="worker", max_tokens=8, temperature=0.0)
    assert model_run(request) is None
    built: list[object] = []
    monkeypatch.setattr(ModelRun, "__init__", lambda self, run: built.append(run))
    app = compile_apr_graph(settings=settings_for(echo_server(make_server, 2)))
    async for _ in app.astream({"task": "t"}, stream_mode=["custom", "values"]):
        pass
    assert built == []


async def test_a_chat_model_backend_is_reported_once_by_the_model_itself(
    make_server: ServerFactory,
) -> None:
    from langchain_openai import ChatOpenAI

    from apr_graph.chat_model import ChatModelClient

    server = make_server(
        [  # a chat model's requests carry the same messages: the rules go by role
            Rule(role="planner", reply=Reply(content=parallel_plan(2))),
            echo_worker(),
            merge_synth(),
        ]
    )
    model = ChatOpenAI(base_url=server.base_url, api_key="k", model="test-model", max_retries=0)
    client = ChatModelClient(model, settings_for(server))
    try:
        ids = set()
        app = compile_apr_graph(client=client)
        async for chunk, _ in app.astream({"task": "t"}, stream_mode="messages"):
            ids.add(chunk.id)
    finally:
        await model.root_async_client.close()
        await client.aclose()
    assert len(ids) == len(server.chat_requests()) == 4


async def test_messages_stream_through_a_parent_graph(make_server: ServerFactory) -> None:
    from langgraph.graph import END, START, StateGraph
    from typing_extensions import TypedDict

    class Parent(TypedDict, total=False):
        task: str
        answer: str

    server = echo_server(make_server, 2)
    builder = StateGraph(Parent)
    builder.add_node("reason", compile_apr_graph(settings=settings_for(server)))
    builder.add_edge(START, "reason")
    builder.add_edge("reason", END)
    parent = builder.compile()

    seen: dict[str, tuple[tuple[str, ...], str]] = {}
    async for namespace, (chunk, meta) in parent.astream(
        {"task": "t"}, stream_mode="messages", subgraphs=True
    ):
        seen[chunk.id] = (namespace, meta["apr_role"])
    assert sorted(role for _, role in seen.values()) == [
        "planner",
        "synthesizer",
        "worker",
        "worker",
    ]
    assert all(namespace and namespace[0].startswith("reason:") for namespace, _ in seen.values())


async def test_a_native_reasoners_text_completions_reach_a_tracer(
    make_server: ServerFactory,
) -> None:
    from tests.test_native import threadweaver_model

    server = make_server([Rule(reply=threadweaver_model(nested=False))])
    recorder = Recorder()
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver"))
    await app.ainvoke({"task": "Compute 2+3 and 4*5"}, config={"callbacks": [recorder]})

    sent = [r for r in server.requests if r.path.endswith("/completions")]
    assert sorted(recorder.prompts.values()) == sorted(r.prompt for r in sent)
    assert set(recorder.ends) == set(recorder.prompts)
    texts = sorted(r.generations[0][0].text for r in recorder.ends.values())
    assert " 2+3=5" in texts  # a thread continues its prompt "<Thread>\n1:"
    assert all(
        "".join(recorder.tokens[i]) == recorder.ends[i].generations[0][0].text
        for i in recorder.ends
    )
