"""Per-run settings: one compiled graph serves runs with different models, widths and merges."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from pydantic import ValidationError

from apr_graph import AprContext, AprSettings, ConfigurationError, compile_apr_graph
from apr_graph.context import GRAPH_ONLY
from apr_graph.integrations import make_graph
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory, settings_for
from tests.test_graph import echo_server, echo_worker, merge_synth, parallel_plan

PROBES = {"/props", "/slots", "/metrics", "/v1/models"}
"""What a capacity probe asks (``apr_graph.capacity``)."""

RUN_TAG = re.compile(r"\brun-(\d+)\b")

CONTEXTS: list[dict[str, Any] | None] = [
    {"model": "model-a", "max_threads": 1, "merge": "concat", "worker_max_tokens": 300},
    {"model": "model-b", "max_threads": 2, "merge": "synthesize", "worker_max_tokens": 400},
    {
        "planner_model": "planner-c",
        "worker_model": "worker-c",
        "max_threads": 3,
        "merge": "concat",
        "worker_max_tokens": 500,
        "temperature": 0.5,
    },
    None,  # the graph's own settings
]


def probes(server: ScriptedServer) -> list[str]:
    """The capacity-probe requests the server received."""
    return [r.path for r in server.requests if r.method == "GET" and r.path in PROBES]


def run_of(request: RecordedRequest) -> int:
    """The run a request belongs to: its task names it (``run-7``)."""
    found = RUN_TAG.search(request.all_text)
    assert found is not None, request.all_text[:200]
    return int(found.group(1))


async def test_one_graph_serves_concurrent_runs_each_with_its_own_settings(
    make_server: ServerFactory,
) -> None:
    server = echo_server(make_server, 4)
    app = compile_apr_graph(settings=settings_for(server, max_concurrency=16))
    contexts = [CONTEXTS[i % len(CONTEXTS)] for i in range(20)]

    results = await asyncio.gather(
        *(
            app.ainvoke({"task": f"Compute parts 1 to 4 of run-{i}."}, context=context)
            for i, context in enumerate(contexts)
        )
    )

    by_run: dict[int, list[RecordedRequest]] = {}
    for request in server.chat_requests():
        by_run.setdefault(run_of(request), []).append(request)
    assert sorted(by_run) == list(range(20))
    for i, context in enumerate(contexts):
        effective = {"model": "test-model", "max_threads": 8, "worker_max_tokens": 1024}
        effective |= {"merge": "synthesize", "temperature": 0.0} | (context or {})
        requests = by_run[i]
        roles = {r.role: r for r in requests}
        workers = [r for r in requests if r.role == "worker"]
        width = min(4, effective["max_threads"])
        assert roles["planner"].body is not None
        assert roles["planner"].body["model"] == effective.get("planner_model", effective["model"])
        assert len(workers) == width, (i, context)
        for worker in workers:
            assert worker.body is not None
            assert worker.body["model"] == effective.get("worker_model", effective["model"])
            assert worker.body["max_tokens"] == effective["worker_max_tokens"]
            assert worker.body["temperature"] == effective["temperature"]
        if effective["merge"] == "concat":
            assert "synthesizer" not in roles
        else:
            assert roles["synthesizer"].body is not None
            assert roles["synthesizer"].body["model"] == effective["model"]
        assert len(results[i]["threads"]) == width
        assert results[i]["metrics"]["merge"] == effective["merge"]
    # One client for the graph: the server was probed once, not once per run.
    assert sorted(probes(server)) == sorted(PROBES)


@pytest.mark.parametrize("use_async", [True, False])
async def test_sync_runs_and_nested_forks_get_the_run_settings(
    make_server: ServerFactory, use_async: bool
) -> None:
    forking = {
        "strategy": "parallel",
        "subtasks": [{"id": "a", "goal": "half a", "fork": True}, {"id": "b", "goal": "half b"}],
    }
    server = make_server(
        [
            Rule(role="planner", contains="half a", reply=Reply(content=parallel_plan(2))),
            Rule(role="planner", reply=Reply(content=forking)),
            echo_worker(),
            merge_synth(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    context = {
        "planner_model": "ctx-planner",
        "worker_model": "ctx-worker",
        "worker_max_tokens": 77,
    }
    inputs = {"task": "Solve both halves."}

    if use_async:
        result = await app.ainvoke(inputs, context=context)
    else:
        result = await asyncio.to_thread(app.invoke, inputs, context=context)

    planners = server.chat_requests("planner")
    workers = server.chat_requests("worker")
    assert len(planners) == 2  # the root and the forked thread's own plan
    assert {r.body["model"] for r in planners if r.body} == {"ctx-planner"}
    assert len(workers) == 3  # b, and the fork's two threads
    assert {r.body["model"] for r in workers if r.body} == {"ctx-worker"}
    assert {r.body["max_tokens"] for r in workers if r.body} == {77}
    assert result["metrics"]["max_depth_reached"] == 2


async def test_budgets_and_deadline_are_per_run(make_server: ServerFactory) -> None:
    slow = " ".join(["slow"] * 20)
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(2))),
            Rule(role="worker", reply=Reply(content=slow, chunk_delay_s=0.03)),
            merge_synth(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))

    hurried, budgeted, free = await asyncio.gather(
        app.ainvoke({"task": "Two parts, run-1."}, context={"deadline_s": 0.2}),
        app.ainvoke({"task": "Two parts, run-2."}, context={"token_budget": 5}),
        app.ainvoke({"task": "Two parts, run-3."}),
    )

    assert hurried["metrics"]["stop_reason"] == "deadline"
    assert budgeted["metrics"]["stop_reason"] == "token_budget"
    assert hurried["metrics"]["incomplete"]
    assert budgeted["metrics"]["incomplete"]
    assert free["metrics"]["stop_reason"] is None
    assert {t["status"] for t in free["threads"]} == {"done"}


@pytest.mark.parametrize(
    ("context", "says"),
    [
        ({"api_key": "sk-secret"}, ["'api_key' cannot be set per run", "AprSettings(api_key="]),
        ({"base_url": "http://elsewhere/v1"}, ["'base_url' cannot be set per run"]),
        ({"max_thread": 2}, ["unknown per-run setting 'max_thread'", "did you mean 'max_threads'"]),
        ({"max_threads": 0}, ["max_threads", "greater than or equal to 1"]),
        ({"max_threads": None}, ["max_threads", "leave it out"]),
        ({"merge": "average"}, ["merge", "'concat', 'synthesize', 'vote', 'race' or 'best'"]),
    ],
)
async def test_a_bad_context_is_refused_before_the_run_starts(
    make_server: ServerFactory, context: dict[str, Any], says: list[str]
) -> None:
    server = echo_server(make_server, 4)
    app = compile_apr_graph(settings=settings_for(server))

    with pytest.raises(ValidationError) as refused:
        await app.ainvoke({"task": "Compute parts 1 to 4."}, context=context)

    for text in says:
        assert text in str(refused.value)
    assert server.requests == []
    assert "sk-secret" not in str(refused.value)


async def test_a_chat_model_graph_refuses_a_per_run_model() -> None:
    direct = AIMessage(content='{"strategy": "direct", "answer": "4"}')
    app = compile_apr_graph(model=GenericFakeChatModel(messages=iter([direct, direct])))

    with pytest.raises(ConfigurationError, match="worker_model cannot be set per run"):
        await app.ainvoke({"task": "What is 2 + 2?"}, context={"worker_model": "other"})
    result = await app.ainvoke({"task": "What is 2 + 2?"}, context={"max_threads": 2})
    assert result["answer"] == "4"


def test_every_setting_is_per_run_or_the_graphs() -> None:
    """A new ``AprSettings`` field must be given a place: per run, or the graph's alone."""
    per_run, graph_only = set(AprContext.model_fields), set(GRAPH_ONLY)
    assert per_run | graph_only == set(AprSettings.model_fields)
    assert not per_run & graph_only
    for name in per_run:  # the same bounds as the setting itself
        setting, run = AprSettings.model_fields[name], AprContext.model_fields[name]
        assert run.metadata == setting.metadata, name
        assert run.annotation == setting.annotation | None, name


async def test_make_graph_builds_once_and_serves_every_run(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = echo_server(make_server, 4)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("APR_MODEL", "env-model")

    first, second = make_graph({}), make_graph({"configurable": {"thread_id": "t"}})
    assert second is first
    await asyncio.gather(
        first.ainvoke({"task": "Compute parts 1 to 4 of run-1."}),
        second.ainvoke({"task": "Compute parts 1 to 4 of run-2."}, context={"model": "other"}),
    )

    models = {run_of(r): r.body["model"] for r in server.chat_requests("planner") if r.body}
    assert models == {1: "env-model", 2: "other"}
    assert sorted(probes(server)) == sorted(PROBES)


def test_the_readme_lists_every_per_run_key() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    paragraph = readme.split("Per run: ", 1)[1].split("; a forked thread", 1)[0]
    listed = set(re.findall(r"`([a-z_*]+)`", paragraph))
    if "*_max_tokens" in listed:  # "the three `*_max_tokens`"
        listed = listed - {"*_max_tokens"} | {
            f"{r}_max_tokens" for r in ("planner", "worker", "synthesizer")
        }
    assert listed == set(AprContext.model_fields)
