"""The graph through its public API, against the scripted server."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from apr_graph import (
    AprSettings,
    ConfigurationError,
    InputError,
    compile_apr_graph,
    create_apr_graph,
)
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory, settings_for

SNAPSHOT = Path(__file__).parent / "snapshots" / "graph.mmd"
UPDATE_SNAPSHOTS = "APR_UPDATE_SNAPSHOTS"


def peak_in_flight(requests: list[RecordedRequest], *, slack_s: float = 0.0) -> int:
    """The most of ``requests`` the server was answering at one moment.

    ``slack_s`` counts a request as over that much before the server recorded its end: the
    server notes the end after its last write, and by then the client may have sent its next
    request (which would look like one too many in flight).
    """

    def in_flight_at(moment: float) -> int:
        return sum(
            1 for o in requests if o.started_at <= moment < (o.ended_at or math.inf) - slack_s
        )

    return max((in_flight_at(r.started_at) for r in requests), default=0)


def parallel_plan(n: int) -> dict[str, Any]:
    return {
        "strategy": "parallel",
        "answer": None,
        "subtasks": [{"id": f"s{i}", "goal": f"compute part {i}"} for i in range(1, n + 1)],
    }


def echo_worker(delay_s: float = 0.0) -> Rule:
    """A worker that answers 'result(<goal>)' after ``delay_s``."""

    def reply(request: RecordedRequest) -> Reply:
        goal = request.last_user_message.split(":", 1)[1].splitlines()[0].strip()
        return Reply(content=f"result({goal})", delay_s=delay_s)

    return Rule(role="worker", reply=reply)


def merge_synth() -> Rule:
    """A synthesizer that returns every result it was given, joined."""

    def reply(request: RecordedRequest) -> Reply:
        found = [line for line in request.last_user_message.splitlines() if "result(" in line]
        return Reply(content=" + ".join(found))

    return Rule(role="synthesizer", reply=reply)


def echo_server(make_server: ServerFactory, parts: int) -> ScriptedServer:
    """A server that plans ``parts`` threads, echoes each goal and joins the results."""
    return make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(parts))),
            echo_worker(),
            merge_synth(),
        ]
    )


async def test_direct_answer_costs_one_call(make_server: ServerFactory) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content={"strategy": "direct", "answer": "4"}))]
    )
    app = compile_apr_graph(settings=settings_for(server))

    result = await app.ainvoke({"task": "What is 2 + 2?"})

    assert result["answer"] == "4"
    assert result["plan"]["strategy"] == "direct"
    assert result["threads"] == [] or "threads" not in result or not result["threads"]
    assert len(server.chat_requests()) == 1
    assert result["metrics"]["model_calls"] == 1
    assert result["metrics"]["threads"] == 0


async def test_parallel_threads_overlap_and_all_results_reach_the_answer(
    make_server: ServerFactory,
) -> None:
    delay = 0.4
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(8))),
            echo_worker(delay),
            merge_synth(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server, max_concurrency=8))

    started = time.perf_counter()
    result = await app.ainvoke({"task": "Compute parts 1 to 8."})
    wall = time.perf_counter() - started

    # Eight 0.4 s threads one after another take 3.2 s; concurrently, little over 0.4 s.
    assert wall < 8 * delay / 2, f"threads did not overlap: {wall:.2f}s"
    for i in range(1, 9):
        assert f"result(compute part {i})" in result["answer"]
    threads = result["threads"]
    assert [t["id"] for t in threads] == [f"s{i}" for i in range(1, 9)]
    assert all(t["status"] == "done" and t["ended_at"] > t["started_at"] for t in threads)
    assert max(t["started_at"] for t in threads) < min(t["ended_at"] for t in threads)
    metrics = result["metrics"]
    assert metrics["model_calls"] == 10
    assert metrics["threads"] == 8
    assert metrics["thread_time_sum_s"] > 3 * metrics["thread_span_s"]
    # The scripted server counts one token per word: each thread answers 3 words, the plan
    # and the merge are counted from what the server sent.
    planner = server.chat_requests("planner")[0]
    plan_tokens = len(json.dumps(parallel_plan(8)).split())
    merge_tokens = len(result["answer"].split())
    assert {t["completion_tokens"] for t in threads} == {3}
    assert planner is not None
    assert metrics["critical_path_tokens"] == plan_tokens + 3 + merge_tokens
    assert metrics["completion_tokens"] == plan_tokens + 8 * 3 + merge_tokens


async def test_synthesis_sees_results_in_plan_order(make_server: ServerFactory) -> None:
    # Later subtasks answer first; the merge prompt must still list s1, s2, s3 in order.
    def worker(request: RecordedRequest) -> Reply:
        sid = request.last_user_message.split()[1].rstrip(":")
        return Reply(content=f"result({sid})", delay_s={"s1": 0.3, "s2": 0.15, "s3": 0.0}[sid])

    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(3))),
            Rule(role="worker", reply=worker),
            merge_synth(),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    assert result["answer"] == "result(s1) + result(s2) + result(s3)"
    finished = sorted(result["threads"], key=lambda t: t["ended_at"])
    assert [t["id"] for t in finished] == ["s3", "s2", "s1"]


async def test_max_concurrency_bounds_requests_in_flight(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(6))),
            echo_worker(0.2),
            merge_synth(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server, max_concurrency=2))
    await app.ainvoke({"task": "six parts"})

    workers = server.chat_requests("worker")
    assert len(workers) == 6
    # Exactly the limit: never more, and the limit really was used (a serial run gives 1).
    # Each request lasts 0.2 s, far longer than the slack.
    assert peak_in_flight(workers, slack_s=0.05) == 2


async def test_oversized_plan_is_clamped_to_max_threads(make_server: ServerFactory) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content=parallel_plan(20))), echo_worker(), merge_synth()]
    )
    result = await compile_apr_graph(settings=settings_for(server, max_threads=3)).ainvoke(
        {"task": "many parts"}
    )
    assert len(server.chat_requests("worker")) == 3
    assert [s["id"] for s in result["plan"]["subtasks"]] == ["s1", "s2", "s3"]
    assert any("clamped 20 subtasks" in note for note in result["plan"]["notes"])
    sent_schema = server.chat_requests("planner")[0].body["response_format"]["json_schema"]
    parallel_branch = sent_schema["schema"]["anyOf"][1]["properties"]
    assert parallel_branch["subtasks"]["maxItems"] == 3
    # Goals alone; their options by goal number, which cannot name a fourth goal.
    assert parallel_branch["subtasks"]["items"] == {"type": "string", "maxLength": 600}
    assert parallel_branch["fork"]["items"]["maximum"] == 3


async def test_empty_parallel_plan_falls_back_to_a_direct_answer(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", times=1, reply=Reply(content={"strategy": "parallel"})),
            Rule(role="planner", reply=Reply(content="The answer is 42.")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "q"})
    assert result["answer"] == "The answer is 42."
    assert result["plan"]["strategy"] == "direct"
    assert len(server.chat_requests("worker")) == 0
    assert len(server.chat_requests()) == 2


async def test_numeric_direct_answer_is_accepted(make_server: ServerFactory) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content={"strategy": "Direct", "answer": 4}))]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "2+2?"})
    assert result["answer"] == "4"
    assert len(server.chat_requests()) == 1


async def test_direct_plan_ignores_junk_subtasks(make_server: ServerFactory) -> None:
    junk = {"strategy": "direct", "answer": "4", "subtasks": [{"id": "x", "goal": "junk"}] * 10}
    server = make_server([Rule(role="planner", reply=Reply(content=junk))])
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "2+2?"})
    assert result["answer"] == "4"
    assert result["plan"]["subtasks"] == []
    assert len(server.chat_requests()) == 1


@pytest.mark.parametrize("refusal_status", [400, 500])
async def test_fallback_chain_on_a_server_without_json_schema(
    make_server: ServerFactory, refusal_status: int
) -> None:
    # vLLM-style servers refuse an unknown mode with 400; llama-cpp-python's with a 500.
    direct = Reply(content={"strategy": "direct", "answer": "ok"})
    server = make_server(
        [Rule(role="planner", reply=direct)],
        response_formats={"json_object"},
        response_format_status=refusal_status,
    )
    app = compile_apr_graph(settings=settings_for(server))

    assert (await app.ainvoke({"task": "first"}))["answer"] == "ok"
    kinds = [r.body["response_format"]["type"] for r in server.chat_requests()]
    assert kinds == ["json_schema", "json_object"]
    json_object = server.chat_requests()[1].body["response_format"]
    branches = json_object["schema"]["anyOf"]
    assert [b["properties"]["strategy"]["enum"] for b in branches] == [["direct"], ["parallel"]]

    # The endpoint's mode is remembered: the next run goes straight to json_object.
    await app.ainvoke({"task": "second"})
    assert [r.body["response_format"]["type"] for r in server.chat_requests()][2:] == [
        "json_object"
    ]


async def test_schema_in_prompt_when_no_response_format_is_accepted(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(content='```json\n{"strategy": "direct", "answer": "ok"}\n```'),
            )
        ],
        response_formats=set(),
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    assert result["answer"] == "ok"
    last = server.chat_requests()[-1]
    assert "response_format" not in last.body
    assert '"strategy"' in last.messages[0]["content"]  # the schema went into the prompt


async def test_wrong_shape_plan_is_reasked_with_the_validation_error(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", times=1, reply=Reply(content={"strategy": "maybe"})),
            Rule(role="planner", reply=Reply(content={"strategy": "direct", "answer": "ok"})),
        ],
        # Schema in the prompt: in json_schema mode a wrong shape means the server dropped the
        # format, which falls back instead (tests/test_real_server_quirks.py).
        response_formats=set(),
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    assert result["answer"] == "ok"
    asked = [r for r in server.chat_requests("planner") if r.status == 200]
    assert len(asked) == 2
    assert "strategy" in asked[1].messages[-1]["content"]


async def test_goals_written_as_labels_are_reasked_and_no_thread_runs_them(
    make_server: ServerFactory,
) -> None:
    # Seen on a 1.5B planner: goals "idea1", "recipe1", "haiku1" (names of the parts, not the
    # parts). The threads guessed, and the answer was headed "idea1".
    labels = {"strategy": "parallel", "merge": "concat", "subtasks": ["idea1", "recipe1"]}
    goals = ["Give three ideas for a party", "Give a recipe for pancakes"]
    server = make_server(
        [
            Rule(role="planner", times=1, reply=Reply(content=labels)),
            Rule(role="planner", reply=Reply(content={**labels, "subtasks": goals})),
            echo_worker(),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke(
        {"task": "Give me three ideas for a party and a recipe for pancakes."}
    )
    assert [s["goal"] for s in result["plan"]["subtasks"]] == goals
    asked = server.chat_requests("planner")
    assert len(asked) == 2
    assert "'idea1' is a label, not a goal" in asked[1].messages[-1]["content"]
    workers = server.chat_requests("worker")
    assert sorted(r.last_user_message.splitlines()[1] for r in workers) == sorted(goals)
    assert "Give a recipe for pancakes" in result["answer"]
    assert "recipe1" not in result["answer"]


async def test_a_planner_that_gives_the_same_invalid_plan_again_is_not_asked_a_third_time(
    make_server: ServerFactory,
) -> None:
    labels = {"strategy": "parallel", "merge": "concat", "subtasks": ["idea1", "recipe1"]}

    def planning(request: RecordedRequest) -> bool:
        return request.system_message.startswith("You are the planner")

    server = make_server(
        [
            Rule(role="planner", where=planning, reply=Reply(content=labels)),
            Rule(role="planner", reply=Reply(content="ideas and a recipe")),  # the direct answer
        ]
    )
    settings = settings_for(server, max_repairs=4)
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "Ideas and a recipe."})
    asked = [r for r in server.chat_requests("planner") if planning(r)]
    assert len(asked) == 2  # the re-ask got the same reply: no third
    assert result["plan"]["notes"] == ["no valid plan (2 attempts): answering directly"]
    assert result["answer"] == "ideas and a recipe"


async def test_a_plan_that_repeats_the_task_under_concat_is_answered_by_one_call(
    make_server: ServerFactory,
) -> None:
    task = "Write a limerick about a cat and a joke about code."
    copies = {"strategy": "parallel", "merge": "concat", "subtasks": [task, task, task]}

    def planning(request: RecordedRequest) -> bool:
        return request.system_message.startswith("You are the planner")

    server = make_server(
        [
            Rule(role="planner", where=planning, reply=Reply(content=copies)),
            Rule(role="planner", reply=Reply(content="a limerick, then a joke")),
            echo_worker(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    events = [e async for e in app.astream({"task": task}, stream_mode="custom")]
    result = await app.ainvoke({"task": task})
    assert result["answer"] == "a limerick, then a joke"
    assert result["threads"] == []
    decision = result["plan"]["decision"]
    assert decision["choice"] == "direct"
    assert decision["reason"].startswith("all 3 subtasks repeat one goal under merge concat")
    # A thread started early for the first copy is closed, not left open.
    started = {e["id"] for e in events if e["event"] == "thread_started"}
    closed = {e["id"] for e in events if e["event"] in {"thread_cancelled", "thread_finished"}}
    assert started <= closed


async def test_planner_that_never_gives_json_still_yields_an_answer(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                where=lambda r: "response_format" in r.body or "JSON schema" in r.all_text,
                reply=Reply(content="I like turtles"),
            ),
            Rule(role="planner", reply=Reply(content="Paris")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server, max_repairs=1)).ainvoke(
        {"task": "Capital of France?"}
    )
    assert result["answer"] == "Paris"
    assert "no valid plan" in result["plan"]["notes"][0]


async def test_think_blocks_are_stripped(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(
                    content='<think>{"strategy": "parallel"} hmm</think>{"strategy": "direct", '
                    '"answer": "<think>x</think>done"}'
                ),
            )
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    assert result["plan"]["strategy"] == "direct"
    assert result["answer"] == "done"


async def test_workers_share_a_byte_identical_prefix(make_server: ServerFactory) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content=parallel_plan(4))), echo_worker(), merge_synth()]
    )
    await compile_apr_graph(settings=settings_for(server)).ainvoke(
        {"task": "four parts", "context": "some shared context"}
    )
    requests = server.chat_requests("worker") + server.chat_requests("synthesizer")
    prefixes = {json.dumps(r.messages[:-1]) for r in requests}
    assert len(prefixes) == 1
    assert len({json.dumps(r.messages[-1]) for r in requests}) == 5
    assert "some shared context" in requests[0].messages[0]["content"]


def test_sync_invoke_works(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(3))),
            echo_worker(0.4),
            merge_synth(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    started = time.perf_counter()
    result = app.invoke({"task": "t"})
    assert time.perf_counter() - started < 1.0  # concurrent: one after another takes 1.2 s
    assert "result(compute part 3)" in result["answer"]
    assert app.invoke({"task": "again"})["metrics"]["threads"] == 3


async def test_bad_input_gets_a_clear_error(make_server: ServerFactory) -> None:
    server = make_server([])
    app = compile_apr_graph(settings=settings_for(server))
    with pytest.raises(InputError, match="non-empty 'task'"):
        await app.ainvoke({"task": "   "})
    with pytest.raises(InputError, match="non-empty 'task'"):
        await app.ainvoke({"question": "wrong key"})  # type: ignore[typeddict-unknown-key]
    assert server.chat_requests() == []


def test_missing_base_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="OPENAI_BASE_URL"):
        create_apr_graph(settings=AprSettings())


def test_graph_shape_snapshot() -> None:
    app = compile_apr_graph(settings=AprSettings(base_url="http://127.0.0.1:9/v1"))
    mermaid = app.get_graph().draw_mermaid()
    regenerate = (
        f"{UPDATE_SNAPSHOTS}=1 python -m pytest -p no:cacheprovider "
        "tests/test_graph.py::test_graph_shape_snapshot, then review and commit "
        f"{SNAPSHOT.relative_to(SNAPSHOT.parents[2])}"
    )
    if os.environ.get(UPDATE_SNAPSHOTS) == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(mermaid)
    if not SNAPSHOT.exists():
        pytest.fail(f"the snapshot {SNAPSHOT} is missing; write it with: {regenerate}")
    assert mermaid == SNAPSHOT.read_text(), f"the graph changed shape; if intended: {regenerate}"


@pytest.mark.parametrize("use_async", [True, False])
async def test_custom_events_stream_plan_and_threads(
    make_server: ServerFactory, use_async: bool
) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content=parallel_plan(2))), echo_worker(), merge_synth()]
    )
    app = compile_apr_graph(settings=settings_for(server))
    if use_async:
        events = [c async for c in app.astream({"task": "t"}, stream_mode="custom")]
    else:
        events = list(app.stream({"task": "t"}, stream_mode="custom"))
    # Notices for the user (e.g. the server did not say how many requests it runs at once)
    # may come first; then the plan and the threads: a thread may start (early=True) while
    # the plan is still streaming in, but none finishes before the plan event.
    notices = [e for e in events if e["event"] == "notice"]
    assert events[: len(notices)] == notices
    events = events[len(notices) :]
    # The merge call's answer streams in last.
    answer = [e for e in events if e["event"] == "answer_token"]
    assert answer
    assert events[-len(answer) :] == answer
    events = events[: -len(answer)]
    kinds = [e["event"] for e in events]
    at_plan = kinds.index("plan")
    assert set(kinds[:at_plan]) <= {"thread_started"}
    assert all(e.get("early") for e in events[:at_plan])
    assert [(s["id"], s["goal"]) for s in events[at_plan]["subtasks"]] == [
        (s["id"], s["goal"]) for s in parallel_plan(2)["subtasks"]
    ]
    assert sorted(kinds) == ["plan"] + ["thread_finished"] * 2 + ["thread_started"] * 2
    finished = {e["id"]: e for e in events if e["event"] == "thread_finished"}
    assert finished["s1"]["status"] == "done"
    assert finished["s1"]["completion_tokens"] == 3
