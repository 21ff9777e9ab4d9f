"""Threads that start while the plan is still streaming in (``AprSettings.stream_plan``)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from apr_graph import compile_apr_graph, graph
from apr_graph.nodes.early import read_plan
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory, eventually, settings_for, wait_until

STEP_S = 0.03
"""One decode step of the planner: slow enough that the plan takes a visible while."""


def plan_json(*goals: str, merge: str = "concat", **extra: Any) -> dict[str, Any]:
    subtasks = [{"id": f"s{i + 1}", "goal": goal, **extra} for i, goal in enumerate(goals)]
    return {"strategy": "parallel", "merge": merge, "subtasks": subtasks}


def own_goal(message: str) -> str:
    """The "Subtask id: goal" line of a thread's last message (after any dependencies)."""
    return next(line for line in message.splitlines() if line.startswith("Subtask "))


def slow_planner(plan: dict[str, Any]) -> Rule:
    return Rule(role="planner", reply=Reply(content=plan, chunk_delay_s=STEP_S))


async def run_replanned(
    make_server: ServerFactory, plan: dict[str, Any]
) -> tuple[ScriptedServer, dict[str, Any]]:
    """Run ``plan`` streamed slowly, with workers that stream their answers and one merge."""
    server = make_server(
        [
            slow_planner(plan),
            Rule(role="worker", reply=Reply(content="part done", chunk_delay_s=STEP_S)),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "q"})
    assert result["answer"] == "merged"
    return server, result


def messages_of(server: ScriptedServer, own: str) -> list[str]:
    """The last messages of the worker requests that contain ``own``, in order."""
    return [
        w.last_user_message for w in server.chat_requests("worker") if own in w.last_user_message
    ]


def test_read_plan_returns_only_complete_subtasks() -> None:
    text = json.dumps(plan_json("first part", "second part"))
    cut = text.index("second") + 3  # inside the second goal
    assert read_plan(text[:cut]) == ("parallel", "concat", [plan_json("first part")["subtasks"][0]])
    assert read_plan(text)[2] == plan_json("first part", "second part")["subtasks"]
    assert read_plan(text[: text.index('"subtasks"')]) == ("parallel", "concat", [])
    # Prose around the JSON (prompt mode), and a goal that mentions braces and brackets.
    tricky = {
        "strategy": "parallel",
        "merge": "vote",
        "subtasks": [{"id": "a", "goal": "f(x) = [1}"}],
    }
    assert (
        read_plan("Here is the plan:\n" + json.dumps(tricky) + "\nDone.")[2] == tricky["subtasks"]
    )
    assert read_plan('{"strategy": "direct", "answer": "4"}') == ("direct", None, [])
    assert read_plan("") == (None, None, [])


async def test_threads_start_before_the_plan_is_finished(make_server: ServerFactory) -> None:
    goals = [f"part {i} of the question" for i in range(1, 5)]
    server = make_server(
        [
            slow_planner(plan_json(*goals)),
            Rule(role="worker", reply=Reply(content="an answer")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "q"})
    planner = server.chat_requests("planner")[0]
    workers = server.chat_requests("worker")
    assert planner.ended_at is not None
    assert len(workers) == 4  # one request per subtask: the early ones were adopted
    first = min(w.started_at for w in workers)
    assert first < planner.ended_at - 5 * STEP_S  # well before the plan's last chunk
    # The run's own records say so too: a worker call began before the planner call ended.
    calls = result["calls"]
    planner_end = next(c["ended_at"] for c in calls if c["role"] == "planner")
    assert min(c["started_at"] for c in calls if c["role"] == "worker") < planner_end
    assert [t["status"] for t in result["threads"]] == ["done"] * 4
    # concat: each part's answer under its subtask, in plan order, and no merge call.
    assert not server.chat_requests("synthesizer")
    positions = [result["answer"].index(goal) for goal in goals]
    assert positions == sorted(positions)
    assert result["answer"].count("an answer") == 4


async def test_subtasks_written_as_bare_goals_start_early_too(make_server: ServerFactory) -> None:
    plan = {"strategy": "parallel", "merge": "concat", "subtasks": ["first goal", "second goal"]}
    server = make_server([slow_planner(plan), Rule(role="worker", reply=Reply(content="answered"))])
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "q"})
    assert [(s["id"], s["goal"]) for s in result["plan"]["subtasks"]] == [
        ("s1", "first goal"),
        ("s2", "second goal"),
    ]
    planner = server.chat_requests("planner")[0]
    assert planner.ended_at is not None
    workers = server.chat_requests("worker")
    assert len(workers) == 2
    assert min(w.started_at for w in workers) < planner.ended_at
    assert result["answer"] == "first goal\nanswered\n\nsecond goal\nanswered"


async def test_stream_plan_off_waits_for_the_whole_plan(make_server: ServerFactory) -> None:
    server = make_server(
        [slow_planner(plan_json("a part", "b part")), Rule(role="worker", reply=Reply(content="x"))]
    )
    settings = settings_for(server, stream_plan=False)
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "q"})
    # The client's own times: the server's handler marks a reply ended after its last write,
    # which a loaded machine may run after the client has read it and sent the next request.
    planner = next(c for c in result["calls"] if c["role"] == "planner")
    workers = [c for c in result["calls"] if c["role"] == "worker"]
    assert len(workers) == 2
    assert all(w["started_at"] >= planner["ended_at"] for w in workers)


async def test_a_thread_the_repaired_plan_changes_is_started_again(
    make_server: ServerFactory,
) -> None:
    # s1 and s2 are complete (no dependencies) and start early; then s3 and s4 close a
    # dependency cycle, which the repair turns into the chain s1 -> s2 -> s3 -> s4. s1's
    # request is unchanged and adopted; s2 now needs s1's result, so its early request is
    # cancelled, recorded as discarded, and sent again once s1 is done.
    cyclic = {
        "strategy": "parallel",
        "merge": "synthesize",
        "subtasks": [
            {"id": "s1", "goal": "alpha"},
            {"id": "s2", "goal": "beta"},
            {"id": "s3", "goal": "gamma", "depends_on": ["s4"]},
            {"id": "s4", "goal": "delta", "depends_on": ["s3"]},
        ],
    }
    server, result = await run_replanned(make_server, cyclic)
    assert "dependencies form a cycle" in " ".join(result["plan"]["notes"])
    own = [own_goal(w.last_user_message) for w in server.chat_requests("worker")]
    assert sorted(own) == sorted(
        [f"Subtask {s}: {g}" for s, g in [("s1", "alpha"), ("s3", "gamma"), ("s4", "delta")]]
        + ["Subtask s2: beta"] * 2
    )
    discarded = [c for c in result["calls"] if c["mode"] == "discarded"]
    assert [c["thread_id"] for c in discarded] == ["s2"]
    s2 = messages_of(server, "Subtask s2: beta")
    assert ['<result id="s1"' in m for m in s2] == [False, True]  # the second has s1's result
    assert all(t["status"] == "done" for t in result["threads"])


GAMMA_NEEDS_ALPHA_AND_BETA = {
    "strategy": "parallel",
    "merge": "synthesize",
    "subtasks": ["alpha", "beta", "gamma"],
    "depends_on": {"3": [1, 2]},
}
"""Three goals written first; the dependency after them (gamma already started early)."""


async def test_a_dependency_written_after_the_goals_restarts_that_thread_with_its_inputs(
    make_server: ServerFactory,
) -> None:
    # Goals come first and start as they are written; "depends_on" follows them. The thread
    # it names was started without its inputs: that request is discarded and sent again with
    # the results it needs; the others are adopted.
    plan = GAMMA_NEEDS_ALPHA_AND_BETA
    server, result = await run_replanned(make_server, plan)
    assert [(s["id"], s["depends_on"]) for s in result["plan"]["subtasks"]] == [
        ("s1", []),
        ("s2", []),
        ("s3", ["s1", "s2"]),
    ]
    discarded = [c for c in result["calls"] if c["mode"] == "discarded"]
    assert [c["thread_id"] for c in discarded] == ["s3"]
    gamma = messages_of(server, "Subtask s3: gamma")
    assert [('<result id="s1"' in m and '<result id="s2"' in m) for m in gamma] == [False, True]
    assert len(server.chat_requests("worker")) == 4  # s1 and s2 once each, s3 twice


@pytest.mark.parametrize(
    ("merge", "dead_end_offered", "ask"),
    [
        ("concat", False, "Solve only this:\n"),
        ("synthesize", True, "Reply with the answer to this subtask only"),
    ],
)
async def test_threads_of_a_list_of_questions_are_asked_to_solve_and_not_offered_a_dead_end(
    make_server: ServerFactory, merge: str, dead_end_offered: bool, ask: str
) -> None:
    # A 1.5B model answered 8 of 12 general sub-questions with bare numbers when told to
    # "reply with the answer", 10 when asked to solve; with DEAD END offered, "solve" made it
    # give up on plain subtractions. A concat plan's parts are the task's own questions.
    server = make_server(
        [
            slow_planner(plan_json("first question", "second question", merge=merge)),
            Rule(role="worker", reply=Reply(content="answer", chunk_delay_s=STEP_S)),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "q"})
    workers = server.chat_requests("worker")
    assert len(workers) == 2  # started while the plan streamed in, and adopted
    assert not [c for c in result["calls"] if c["mode"] == "discarded"]
    for request in workers:
        assert ("DEAD END" in request.messages[0]["content"]) is dead_end_offered
        assert ask in request.last_user_message
    merges = server.chat_requests("synthesizer")
    assert all(m.messages[0] == workers[0].messages[0] for m in merges)  # one shared prefix


async def test_a_subtask_past_max_threads_is_never_started(make_server: ServerFactory) -> None:
    server = make_server(
        [
            slow_planner(plan_json("one", "two", "three", merge="synthesize")),
            Rule(role="worker", reply=Reply(content="done it")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server, max_threads=2)).ainvoke(
        {"task": "q"}
    )
    assert [s["goal"] for s in result["plan"]["subtasks"]] == ["one", "two"]
    own = sorted(own_goal(w.last_user_message) for w in server.chat_requests("worker"))
    assert own == ["Subtask s1: one", "Subtask s2: two"]
    assert result["answer"] == "merged"


async def test_direct_plans_start_no_thread(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(content={"strategy": "direct", "answer": "4"}, chunk_delay_s=STEP_S),
            )
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "2+2?"})
    assert result["answer"] == "4"
    assert not server.chat_requests("worker")


async def test_a_vote_plan_gives_early_voters_the_final_line_rule(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            slow_planner(
                plan_json(
                    *(f"attempt {n}" for n in range(1, 5)),
                    merge="vote",
                )
            ),
            Rule(role="worker", reply=Reply(content="work\nFinal answer: 7")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "q"})
    assert result["answer"] == "7"
    # Three agreeing voters settle it: the fourth may never be sent, or be cancelled while
    # its body is on the way (the server then records it without one).
    workers = [w for w in server.chat_requests("worker") if w.body is not None]
    assert len(workers) >= 3
    assert all("Final answer" in w.last_user_message for w in workers), [
        w.last_user_message for w in workers
    ]
    planner = server.chat_requests("planner")[0]
    assert planner.ended_at is not None
    assert min(w.started_at for w in workers) < planner.ended_at


async def test_cancelling_while_planning_closes_the_early_threads(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(content=plan_json("a", "b", "c " * 60), chunk_delay_s=STEP_S),
            ),
            Rule(role="worker", reply=Reply(content="long " * 200, chunk_delay_s=STEP_S)),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    run = asyncio.ensure_future(app.ainvoke({"task": "q"}))
    await eventually(lambda: len(server.chat_requests("worker")) == 2, "two early threads")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await eventually(
        lambda: all(r.ended_at is not None for r in server.requests), "every request closed"
    )
    assert {r.status for r in server.chat_requests("worker")} == {499}
    assert len(graph.boards_of(app)) == 0


async def test_early_threads_stream_their_tokens_once_in_order(make_server: ServerFactory) -> None:
    server = make_server(
        [
            slow_planner(plan_json("a part", "b part", "c part")),
            Rule(role="worker", reply=Reply(content="one two three four")),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server, stream_tokens=True))
    events = [e async for e in app.astream({"task": "q"}, stream_mode="custom")]
    for sid in ("s1", "s2", "s3"):
        text = "".join(e["text"] for e in events if e["event"] == "token" and e["id"] == sid)
        assert text.split() == ["one", "two", "three", "four"]
        started = [e for e in events if e["event"] == "thread_started" and e["id"] == sid]
        assert len(started) == 1


async def test_concat_shows_a_missing_part_as_missing(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan_json("first q", "second q", "third q"))),
            Rule(
                role="worker",
                contains="second q",
                reply=Reply(status=400, error_message="bad request for this one"),
            ),
            Rule(role="worker", reply=Reply(content="it is known")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "q"})
    answer = result["answer"]
    assert answer.index("first q") < answer.index("second q") < answer.index("third q")
    second = answer.split("second q", 1)[1].split("third q", 1)[0]
    assert "(no answer:" in second
    assert "bad request for this one" in second
    assert answer.count("it is known") == 2
    assert not server.chat_requests("synthesizer")


async def test_a_merge_call_streams_the_answer_as_it_is_written(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan_json("x", "y", merge="synthesize"))),
            Rule(role="worker", reply=Reply(content="part")),
            # It keeps the threads' one-word answer, so nothing is added back after it.
            Rule(role="synthesizer", reply=Reply(content="the merged part, word by word")),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    pieces: list[str] = []
    final: dict[str, Any] = {}
    async for mode, chunk in app.astream({"task": "q"}, stream_mode=["custom", "values"]):
        if mode == "custom" and chunk["event"] == "answer_token":
            pieces.append(chunk["text"])
        elif mode == "values":
            final = chunk
    assert len(pieces) > 3
    assert "".join(pieces) == final["answer"] == "the merged part, word by word"


def test_a_growing_plan_is_decoded_once_per_subtask(monkeypatch: pytest.MonkeyPatch) -> None:
    from apr_graph.nodes import early

    goals = [f"part {i}" for i in range(200)]
    text = json.dumps(plan_json(*goals))
    pieces = range(0, len(text) + 1, 7)  # the stream brings 7 characters at a time
    reader = early.PlanReader()
    for end in pieces:
        assert reader.read(text[:end]) == read_plan(text[:end])
    assert reader.read(text)[2] == plan_json(*goals)["subtasks"]

    tries: list[int] = []

    class Counting(json.JSONDecoder):
        def raw_decode(self, s: str, idx: int = 0) -> tuple[Any, int]:
            tries.append(idx)
            return super().raw_decode(s, idx)

    monkeypatch.setattr(early, "_DECODER", Counting())
    reader = early.PlanReader()
    for end in pieces:
        reader.read(text[:end])
    # Each subtask once, plus at most one unfinished one per piece (read afresh every
    # time, the 200 subtasks cost about 200 x 600 / 2 tries).
    assert len(tries) <= len(goals) + len(pieces)


def test_a_plan_that_starts_over_is_read_afresh() -> None:
    from apr_graph.nodes.early import PlanReader

    reader = PlanReader()
    first = json.dumps(plan_json("alpha", "beta", merge="vote"))
    assert len(reader.read(first)[2]) == 2
    again = json.dumps(plan_json("gamma", merge="concat"))  # the request was sent again
    assert reader.read(again[:5]) == (None, None, [])
    assert reader.read(again) == ("parallel", "concat", plan_json("gamma")["subtasks"])
    assert reader.restarts == 1


# Thread caps bound the worker requests sent, early ones included.

BRANCHES = {
    "strategy": "parallel",
    "merge": "synthesize",
    "subtasks": ["branch one", "branch two"],
    "fork": [1, 2],
}
STEPS = {  # each branch's own plan; at max_depth=2 its forks are cleared
    "strategy": "parallel",
    "merge": "synthesize",
    "subtasks": ["step one", "step two", "step three"],
    "fork": [1, 2, 3],
    "depends_on": {"2": [1]},
}


def answers_directly(request: RecordedRequest) -> bool:
    """A planner request for a plain answer (not for a plan, which asks for JSON)."""
    return "response_format" not in (request.body or {})


@pytest.mark.parametrize("stream_plan", [True, False])
async def test_every_plan_forking_sends_at_most_max_total_threads_worker_requests(
    make_server: ServerFactory, stream_plan: bool
) -> None:
    # The plan schema has "fork" and "depends_on" follow the goals, so a streamed plan's
    # threads start before the planner says they fork or wait for another. A slow warm-up
    # keeps both branches planning at once, each seeing the same free slots.
    server = make_server(
        [
            Rule(role="warmup", reply=Reply(content="OK", delay_s=0.3)),
            Rule(role="planner", where=answers_directly, reply=Reply(content="said directly")),
            Rule(role="planner", contains="branch ", reply=Reply(content=STEPS)),
            Rule(role="planner", reply=Reply(content=BRANCHES)),
            Rule(role="worker", reply=Reply(content="leaf result")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    settings = settings_for(
        server, max_depth=2, max_total_threads=5, stream_plan=stream_plan, warm_prefix=True
    )
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "fork everything"})
    assert len(server.chat_requests("worker")) <= 5
    assert len(result["threads"]) <= 5
    # What ran is merged: each leaf that ran answered, each branch merged its leaves (or,
    # left without a slot, answered directly), and the last merge got both branches.
    leaves = [t for t in result["threads"] if t["depth"] == 2]
    assert leaves
    assert [(t["status"], t["answer"]) for t in leaves] == [("done", "leaf result")] * len(leaves)
    branches = [t for t in result["threads"] if t["depth"] == 1]
    assert [t["status"] for t in branches] == ["done", "done"]
    top = server.chat_requests("synthesizer")[-1].last_user_message
    for branch in branches:
        assert branch["answer"] in {"merged", "leaf result", "said directly"}
        assert f"{branch['goal']}" in top
        assert branch["answer"] in top
    assert result["answer"].startswith("merged")  # a part the fake merge dropped comes after


@pytest.mark.parametrize("warm_prefix", [False, True])
async def test_a_thread_sent_again_with_its_inputs_needs_a_slot_of_its_own(
    make_server: ServerFactory, warm_prefix: bool
) -> None:
    # All three goals start as they are written; then gamma turns out to need alpha and
    # beta, so its early request is of no use. Sent, it spent gamma's slot, and with no
    # slot left gamma is not sent again. Held back behind a slow warm-up, it was never
    # sent: the slot comes back and gamma runs once, with its inputs.
    plan = GAMMA_NEEDS_ALPHA_AND_BETA
    servers: list[ScriptedServer] = []

    def warm_after_the_plan(_: RecordedRequest) -> Reply:
        wait_until(lambda: servers[0].chat_requests("planner")[0].ended_at, "the plan")
        time.sleep(0.3)  # the node settles its early threads as soon as it has read the plan
        return Reply(content="OK")

    server = make_server(
        [
            Rule(role="warmup", reply=warm_after_the_plan),
            Rule(role="planner", reply=Reply(content=plan, chunk_delay_s=0.01)),
            Rule(role="worker", reply=Reply(content="part done")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    servers.append(server)
    settings = settings_for(server, max_total_threads=3, warm_prefix=warm_prefix)
    app = compile_apr_graph(settings=settings)
    events: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    async for mode, chunk in app.astream({"task": "q"}, stream_mode=["custom", "values"]):
        if mode == "custom":
            events.append(chunk)
        else:
            final = chunk
    assert len(server.chat_requests("worker")) == 3
    assert final["answer"] == "merged"
    gamma = messages_of(server, "Subtask s3: gamma")
    if warm_prefix:
        assert [t["status"] for t in final["threads"]] == ["done"] * 3
        assert ['<result id="s1"' in m and '<result id="s2"' in m for m in gamma] == [True]
    else:
        assert [t["id"] for t in final["threads"]] == ["s1", "s2"]
        assert "max_total_threads" in " ".join(final["plan"]["notes"])
        assert [c["thread_id"] for c in final["calls"] if c["mode"] == "discarded"] == ["s3"]
        cancelled = [e for e in events if e["event"] == "thread_cancelled"]
        assert [e["id"] for e in cancelled] == ["s3"]
        assert "max_total_threads" in cancelled[0]["reason"]
        merge = server.chat_requests("synthesizer")[0].last_user_message
        assert "alpha" in merge
        assert "beta" in merge
        assert "gamma" not in merge


# The events of threads started early.

CLOSING = {"thread_finished", "thread_cancelled"}


def assert_every_start_is_closed(events: list[dict[str, Any]]) -> None:
    """Each ``thread_started`` is followed by exactly one closing event of its thread."""
    open_ids: list[str] = []
    for event in events:
        if event["event"] == "thread_started":
            assert event["id"] not in open_ids, f"{event['id']} started twice"
            open_ids.append(event["id"])
        elif event["event"] in CLOSING and event["id"] in open_ids:
            open_ids.remove(event["id"])
            if event["event"] == "thread_cancelled" and any(
                e["event"] == "thread_finished" and e["id"] == event["id"]
                for e in events[events.index(event) + 1 :]
            ):
                open_ids.append(event["id"])  # a worker's cancel: its record follows
    assert open_ids == [], f"never closed: {open_ids}"


async def test_an_early_thread_the_final_plan_drops_is_cancelled(
    make_server: ServerFactory,
) -> None:
    # The planner's first reply is cut off after three goals (all started early); asked
    # again, it keeps only the first. The two it dropped are closed, with the reason.
    cut = json.dumps(plan_json("alpha", "beta", "gamma"))[:-1] + ', "fork": ['  # cut off
    server = make_server(
        [
            Rule(role="planner", times=1, reply=Reply(content=cut, chunk_delay_s=STEP_S)),
            slow_planner(plan_json("alpha")),
            Rule(role="worker", reply=Reply(content="part done", chunk_delay_s=STEP_S)),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    events = [e async for e in app.astream({"task": "q"}, stream_mode="custom")]
    started = [e["id"] for e in events if e["event"] == "thread_started"]
    assert started == ["s1", "s2", "s3"]
    assert_every_start_is_closed(events)
    cancelled = {e["id"]: e for e in events if e["event"] == "thread_cancelled"}
    assert sorted(cancelled) == ["s2", "s3"]
    assert all(e["reason"] for e in cancelled.values())
    finished = [(e["id"], e["status"]) for e in events if e["event"] == "thread_finished"]
    assert finished == [("s1", "done")]
    assert len(server.chat_requests("worker")) == 3  # s1's early request was adopted


async def test_the_live_view_never_moves_a_thread_backwards(make_server: ServerFactory) -> None:
    from apr_graph.cli_view import LiveView

    # Three threads start early; the re-asked plan adopts s1, gives s2 another goal (sent
    # again) and drops s3. None of the rows goes back to "queued" when the plan arrives.
    cut = json.dumps(plan_json("alpha", "beta", "gamma"))[:-1] + ', "fork": ['  # cut off
    server = make_server(
        [
            Rule(role="planner", times=1, reply=Reply(content=cut, chunk_delay_s=STEP_S)),
            slow_planner(plan_json("alpha", "delta")),
            Rule(role="worker", reply=Reply(content="part done", chunk_delay_s=STEP_S)),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    view = LiveView()  # what `apr ask` shows on a terminal (not started: nothing drawn)
    order = {"queued": 0, "running": 1}  # anything else is an outcome
    seen: dict[str, list[str]] = {}
    async for event in app.astream({"task": "q"}, stream_mode="custom"):
        view.on_event(event)
        for tid, row in view.threads.items():
            statuses = seen.setdefault(tid, [])
            if not statuses or statuses[-1] != row["status"]:
                statuses.append(row["status"])
    for tid, statuses in seen.items():
        ranks = [order.get(s, 2) for s in statuses]
        assert ranks == sorted(ranks), f"{tid}: {statuses}"
    assert seen == {
        "s1": ["running", "done"],
        "s2": ["running", "done"],
        "s3": ["running", "cancelled"],
    }
    assert [view.threads[t]["goal"] for t in ("s1", "s2")] == ["alpha", "delta"]
