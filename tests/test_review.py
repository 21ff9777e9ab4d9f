"""Plan review (``review_plan``): a run pauses with LangGraph's ``interrupt`` once its plan is
made, before any thread's request, and runs the plan a ``Command(resume=...)`` approves."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.types import Command

from apr_graph import compile_apr_graph
from apr_graph.errors import ConfigurationError
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory, settings_for

TASK = "Describe (a) bees (b) glass (c) paper"
PLAN = {"strategy": "parallel", "merge": "concat", "subtasks": ["bees", "glass", "paper"]}
REVIEW = {"review_plan": True}


def answer(request: RecordedRequest) -> Reply:
    return Reply(content=f"on {request.last_user_message.splitlines()[-1]}", chunk_delay_s=0.01)


def server_for(make_server: ServerFactory) -> ScriptedServer:
    return make_server(
        [Rule(role="planner", reply=Reply(content=PLAN)), Rule(role="worker", reply=answer)]
    )


def goals_sent(server: ScriptedServer) -> list[str]:
    return sorted(r.last_user_message.splitlines()[-1] for r in server.chat_requests("worker"))


async def paused(make_server: ServerFactory) -> tuple[ScriptedServer, Any, Any, dict[str, Any]]:
    """A server, a graph with a checkpointer, the run's config, and the run paused for review."""
    server = server_for(make_server)
    app = compile_apr_graph(settings=settings_for(server), checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "job"}}
    return server, app, config, await app.ainvoke({"task": TASK}, config, context=REVIEW)


async def test_a_run_waits_for_its_plan_to_be_approved_and_sends_nothing_before(
    make_server: ServerFactory,
) -> None:
    server, app, config, paused_run = await paused(make_server)

    (asked,) = paused_run["__interrupt__"]
    assert [s["goal"] for s in asked.value["plan"]["subtasks"]] == ["bees", "glass", "paper"]
    assert asked.value["task"] == TASK
    await asyncio.sleep(0.2)  # the plan streamed, yet no thread started early
    assert len(server.chat_requests()) == 1
    state = await app.aget_state(config)
    assert state.next == ("review",)

    # The resume need not say review_plan again: the checkpoint holds the plan for review.
    done = await app.ainvoke(Command(resume=True), config)

    assert done["answer"] == "bees\non bees\n\nglass\non glass\n\npaper\non paper"
    assert done["plan"]["review"] == "approved"
    assert goals_sent(server) == ["bees", "glass", "paper"]
    assert done["plan"]["decision"]["by"] == "quality"  # run as the planner planned


async def test_an_edited_plan_runs_instead_and_a_wrong_reply_asks_again(
    make_server: ServerFactory,
) -> None:
    server, app, config, _ = await paused(make_server)

    again = await app.ainvoke(Command(resume="no"), config)
    (asked,) = again["__interrupt__"]
    assert "resume with Command(resume=True)" in asked.value["error"]
    assert len(asked.value["plan"]["subtasks"]) == 3  # the plan is still there to approve
    again = await app.ainvoke(Command(resume={"subtasks": []}), config)
    assert "no subtasks" in again["__interrupt__"][0].value["error"]

    done = await app.ainvoke(Command(resume=["bees", "paper, in French"]), config)

    assert done["answer"] == "bees\non bees\n\npaper, in French\non paper, in French"
    assert goals_sent(server) == ["bees", "paper, in French"]
    decision = done["plan"]["decision"]
    assert (decision["choice"], decision["by"]) == ("parallel", "review")
    assert done["plan"]["review"] == "edited"
    assert [t["goal"] for t in done["threads"]] == ["bees", "paper, in French"]


def test_a_sync_run_is_reviewed_too(make_server: ServerFactory) -> None:
    server = server_for(make_server)
    app = compile_apr_graph(
        settings=settings_for(server, review_plan=True), checkpointer=InMemorySaver()
    )
    config: Any = {"configurable": {"thread_id": "job"}}

    assert "__interrupt__" in app.invoke({"task": TASK}, config)
    assert server.chat_requests("worker") == []
    done = app.invoke(Command(resume={"subtasks": ["glass"], "merge": "concat"}), config)

    assert done["answer"] == "glass\non glass"


async def test_a_reviewed_plan_resumes_in_another_process_with_its_deadline_from_then(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    server = server_for(make_server)
    settings = settings_for(server, review_plan=True, deadline_s=1.0)
    config: Any = {"configurable": {"thread_id": "job"}}
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "runs.sqlite")) as saver:
        await compile_apr_graph(settings=settings, checkpointer=saver).ainvoke(
            {"task": TASK}, config
        )
    await asyncio.sleep(1.2)  # longer than the run's deadline: a person took their time

    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "runs.sqlite")) as saver:
        app = compile_apr_graph(settings=settings, checkpointer=saver)  # a new graph
        done = await app.ainvoke(Command(resume=True), config)

    assert done["metrics"]["stop_reason"] is None
    assert goals_sent(server) == ["bees", "glass", "paper"]
    assert done["answer"].count("on ") == 3


async def test_review_without_a_checkpointer_is_a_clear_error(make_server: ServerFactory) -> None:
    server = server_for(make_server)
    app = compile_apr_graph(settings=settings_for(server))

    with pytest.raises(ConfigurationError, match="compile it with a checkpointer"):
        await app.ainvoke({"task": TASK}, context=REVIEW)
    assert server.chat_requests("worker") == []


async def test_a_direct_answer_is_not_held_for_review(make_server: ServerFactory) -> None:
    direct = {"strategy": "direct", "answer": "Paris"}
    server = make_server([Rule(role="planner", reply=Reply(content=direct))])
    app = compile_apr_graph(settings=settings_for(server), checkpointer=InMemorySaver())

    done = await app.ainvoke(
        {"task": "Capital of France?"}, {"configurable": {"thread_id": "j"}}, context=REVIEW
    )

    assert "__interrupt__" not in done
    assert done["answer"] == "Paris"
