"""apr-graph through the real LangChain / LangGraph APIs: agent tool, subgraph, events."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph

from apr_graph import as_tool, compile_apr_graph
from apr_graph.testing import RecordedRequest, Reply, Rule
from tests.conftest import ServerFactory, settings_for
from tests.test_graph import echo_worker, merge_synth, parallel_plan

ROOT = Path(__file__).parent.parent


class ToolCallingFake(GenericFakeChatModel):
    """A scripted chat model that accepts tools (as agents require)."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCallingFake:  # type: ignore[override]
        return self


def three_part_server(make_server: ServerFactory) -> Any:
    return make_server(
        [Rule(role="planner", reply=Reply(content=parallel_plan(3))), echo_worker(), merge_synth()]
    )


@pytest.mark.parametrize("use_async", [True, False])
async def test_agent_delegates_to_the_tool(make_server: ServerFactory, use_async: bool) -> None:
    server = three_part_server(make_server)
    tool = as_tool(compile_apr_graph(settings=settings_for(server)))
    call = {
        "name": "parallel_reasoning",
        "args": {"task": "Compute parts 1 to 3."},
        "id": "call-1",
        "type": "tool_call",
    }
    model = ToolCallingFake(
        messages=iter(
            [
                AIMessage(content="", tool_calls=[call]),
                AIMessage(content="All three parts are computed."),
            ]
        )
    )
    agent = create_agent(model, tools=[tool])
    inputs = {"messages": [{"role": "user", "content": "Compute parts 1 to 3 for me"}]}
    result = await agent.ainvoke(inputs) if use_async else agent.invoke(inputs)
    messages: list[BaseMessage] = result["messages"]
    tool_message = next(m for m in messages if isinstance(m, ToolMessage))
    assert "result(compute part 3)" in str(tool_message.content)
    assert tool_message.artifact["metrics"]["threads"] == 3
    assert [t["id"] for t in tool_message.artifact["threads"]] == ["s1", "s2", "s3"]
    assert messages[-1].content == "All three parts are computed."
    assert server.chat_requests("planner")[0].messages[-1]["content"].count("Compute parts") == 1


async def test_an_agent_passes_files_to_the_tool_as_named_documents(
    make_server: ServerFactory,
) -> None:
    def worker(request: RecordedRequest) -> Reply:
        goal = request.last_user_message.splitlines()[-1]
        return Reply(content=f"read {json.dumps(request.messages[0]['content'])[-40:]} for {goal}")

    server = make_server([Rule(role="worker", reply=worker)])  # a map over files: no planner
    tool = as_tool(compile_apr_graph(settings=settings_for(server)))
    schema = json.dumps(tool.tool_call_schema.model_json_schema())
    assert '"additionalProperties": {"type": "string"}' in schema  # the model sees the mapping
    files = {"calc.py": "def mean(): ...  # CALC-FILE", "io.py": "def load(): ...  # IO-FILE"}
    call = {
        "name": "parallel_reasoning",
        "args": {"task": "Review for bugs: (a) calc.py (b) io.py", "context": files},
        "id": "call-1",
        "type": "tool_call",
    }
    model = ToolCallingFake(messages=iter([AIMessage(content="", tool_calls=[call]), "Done."]))
    result = await create_agent(model, tools=[tool]).ainvoke(
        {"messages": [{"role": "user", "content": "Review my two files"}]}
    )
    tool_message = next(m for m in result["messages"] if isinstance(m, ToolMessage))
    sent = {
        r.last_user_message.splitlines()[-1]: r.messages[0]["content"]
        for r in server.chat_requests("worker")
    }
    assert "CALC-FILE" in sent["(a) calc.py"]
    assert "IO-FILE" not in sent["(a) calc.py"]
    assert "IO-FILE" in sent["(b) io.py"]
    assert [t["goal"] for t in tool_message.artifact["threads"]] == ["(a) calc.py", "(b) io.py"]


class ParentState(TypedDict, total=False):
    task: str
    answer: str
    metrics: dict[str, Any]
    notes: list[str]


async def test_subgraph_in_a_parent_graph_streams_its_events(make_server: ServerFactory) -> None:
    server = three_part_server(make_server)
    apr = compile_apr_graph(settings=settings_for(server))

    def prepare(state: ParentState) -> dict[str, Any]:
        return {"notes": ["prepared"], "task": state["task"].strip()}

    def review(state: ParentState) -> dict[str, Any]:
        return {"notes": [*state["notes"], f"reviewed {state['metrics']['threads']} threads"]}

    parent = StateGraph(ParentState)
    parent.add_node("prepare", prepare)
    parent.add_node("reason", apr)
    parent.add_node("review", review)
    parent.add_edge(START, "prepare")
    parent.add_edge("prepare", "reason")
    parent.add_edge("reason", "review")
    parent.add_edge("review", END)
    app = parent.compile()

    custom: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    final: dict[str, Any] = {}
    async for namespace, mode, chunk in app.astream(
        {"task": "  three parts  "}, stream_mode=["custom", "values"], subgraphs=True
    ):
        if mode == "custom":
            custom.append((namespace, chunk))
        elif not namespace:
            final = chunk
    assert final["notes"] == ["prepared", "reviewed 3 threads"]
    assert "result(compute part 2)" in final["answer"]
    kinds = [event["event"] for _, event in custom]
    assert kinds.count("thread_finished") == 3
    assert all(ns and ns[0].startswith("reason:") for ns, _ in custom)  # from the subgraph


async def test_token_and_cancel_events(make_server: ServerFactory) -> None:
    racing = {
        "strategy": "parallel",
        "merge": "race",
        "subtasks": [{"id": "fast", "goal": "quick way"}, {"id": "slow", "goal": "long way"}],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=racing)),
            Rule(role="worker", contains="quick way", reply=Reply(content="good quick answer")),
            Rule(
                role="worker",
                contains="long way",
                reply=Reply(content="good " + "slow " * 50, chunk_delay_s=0.05),
            ),
        ]
    )
    app = compile_apr_graph(
        settings=settings_for(server, stream_tokens=True),
        verify=lambda answer: answer.startswith("good"),
    )
    events = [e async for e in app.astream({"task": "race"}, stream_mode="custom")]
    fast_text = "".join(e["text"] for e in events if e["event"] == "token" and e["id"] == "fast")
    assert fast_text == "good quick answer"
    cancelled = [e for e in events if e["event"] == "thread_cancelled"]
    assert [e["id"] for e in cancelled] == ["slow"]


def test_langgraph_json_points_at_a_working_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    config = json.loads((ROOT / "langgraph.json").read_text())
    path, _, attribute = config["graphs"]["apr"].partition(":")
    module = importlib.import_module(path.removeprefix("./").removesuffix(".py").replace("/", "."))
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("APR_MAX_THREADS", "3")
    graph = getattr(module, attribute)({})
    assert set(graph.get_graph().nodes) >= {"decompose", "worker", "synthesize"}
    # What the server shows a run may set (Studio's context form): no key, no endpoint.
    per_run = graph.get_context_jsonschema()["properties"]
    assert {"model", "max_threads", "merge", "token_budget", "deadline_s"} <= set(per_run)
    assert not {"api_key", "base_url"} & set(per_run)


async def test_two_endpoints_share_the_load(make_server: ServerFactory) -> None:
    rules = [
        Rule(role="planner", reply=Reply(content=parallel_plan(8))),
        echo_worker(0.3),
        merge_synth(),
    ]
    first, second = make_server(list(rules)), make_server(list(rules))
    settings = settings_for(first, base_urls=[second.base_url], max_concurrency=8)
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "eight parts"})
    assert result["metrics"]["threads"] == 8
    served = [len(first.chat_requests("worker")), len(second.chat_requests("worker"))]
    assert sum(served) == 8
    assert min(served) >= 3  # spread, not all on one replica


async def test_a_dead_endpoint_is_avoided(make_server: ServerFactory) -> None:
    alive = three_part_server(make_server)
    dead = make_server([])
    dead_url = dead.base_url
    dead.stop()
    settings = settings_for(
        alive, base_url=dead_url, base_urls=[alive.base_url], retry_max_wait_s=0.05
    )
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "three parts"})
    assert {t["status"] for t in result["threads"]} == {"done"}
    assert len(alive.chat_requests("worker")) == 3


class RuleChatModel(BaseChatModel):
    """A LangChain chat model answering by the last message, for backend tests."""

    seen: ClassVar[list[str]] = []

    @property
    def _llm_type(self) -> str:
        return "rule-fake"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        last = str(messages[-1].content)
        self.seen.append(last)
        if "<task>" in last and "JSON schema" in str(messages[0].content):
            text = json.dumps(
                {
                    "strategy": "parallel",
                    "subtasks": [
                        {"id": "a", "goal": "name a prime"},
                        {"id": "b", "goal": "name a square"},
                    ],
                }
            )
        elif "Subtask a" in last:
            text = "7"
        elif "Subtask b" in last:
            text = "9"
        else:
            text = "prime 7, square 9"
        message = AIMessage(
            content=text,
            usage_metadata={"input_tokens": 10, "output_tokens": 2, "total_tokens": 12},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


async def test_a_langchain_chat_model_as_the_backend() -> None:
    model = RuleChatModel()
    result = await compile_apr_graph(model=model).ainvoke({"task": "A prime and a square"})
    assert result["answer"] == "prime 7, square 9"
    assert {t["id"]: t["answer"] for t in result["threads"]} == {"a": "7", "b": "9"}
    assert result["metrics"]["model_calls"] == 4
    assert result["metrics"]["prompt_tokens"] == 40
    assert any("Subtask a" in text for text in model.seen)


CAPITALS = {"France": "Paris", "Japan": "Tokyo"}


@tool
def lookup_capital(country: str) -> str:
    """The capital of a country."""
    return CAPITALS[country]  # a KeyError for unknown countries: the model must be told


def tool_worker(request: RecordedRequest) -> Reply:
    tool_results = [m["content"] for m in request.messages if m.get("role") == "tool"]
    if tool_results:
        return Reply(content="found: " + "; ".join(tool_results))
    country = request.last_user_message.split("capital of ")[1].split()[0].strip(".")
    return Reply(tool_calls=[{"name": "lookup_capital", "arguments": {"country": country}}])


async def test_workers_use_tools_and_survive_a_failing_one(make_server: ServerFactory) -> None:
    lookups = {
        "strategy": "parallel",
        "subtasks": [
            {"id": c, "goal": f"find the capital of {c}."} for c in ("France", "Japan", "Atlantis")
        ],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=lookups)),
            Rule(role="worker", reply=tool_worker),
            merge_synth(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server), tools=[lookup_capital])
    result = await app.ainvoke({"task": "Capitals of France, Japan and Atlantis"})
    answers = {t["id"]: t["answer"] for t in result["threads"]}
    assert answers["France"] == "found: Paris"
    assert answers["Japan"] == "found: Tokyo"
    assert answers["Atlantis"].startswith("found: error: KeyError")  # told, not crashed
    first = next(r for r in server.chat_requests("worker") if "France" in r.last_user_message)
    assert first.body["tools"][0]["function"]["name"] == "lookup_capital"
    assert {t["status"] for t in result["threads"]} == {"done"}


async def test_the_tool_loop_is_bounded(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(1))),
            Rule(
                role="worker",
                where=lambda r: "tools" in (r.body or {}),
                reply=Reply(
                    tool_calls=[{"name": "lookup_capital", "arguments": {"country": "France"}}]
                ),
            ),
            Rule(role="worker", reply=Reply(content="giving up on tools")),
            merge_synth(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server, max_tool_calls=3), tools=[lookup_capital])
    result = await app.ainvoke({"task": "t"})
    workers = server.chat_requests("worker")
    assert len(workers) == 4  # three rounds with tools offered, then one without
    assert "tools" not in workers[-1].body
    assert result["threads"][0]["answer"] == "giving up on tools"
