"""Coordination through the public API: forks, dependencies, merges, early stop, budgets."""

from __future__ import annotations

import re
import time
from typing import Any

from apr_graph import compile_apr_graph
from apr_graph.testing import RecordedRequest, Reply, Rule
from tests.conftest import ServerFactory, eventually, settings_for


def plan(*subtasks: dict[str, Any], merge: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"strategy": "parallel", "subtasks": list(subtasks)}
    if merge:
        body["merge"] = merge
    return body


def sub(sid: str, goal: str, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "goal": goal, **extra}


def worker_request(server: Any, goal: str) -> RecordedRequest:
    """The one worker request whose own subtask (not a dependency) is ``goal``."""
    found = [
        r
        for r in server.chat_requests("worker")
        if re.search(rf"Subtask \S+: {re.escape(goal)}(\n|$)", r.last_user_message)
    ]
    assert len(found) == 1, f"{len(found)} worker requests for {goal!r}"
    return found[0]


async def test_every_thread_forking_stays_within_depth_and_total_caps(
    make_server: ServerFactory,
) -> None:
    forking = plan(sub("a", "part a", fork=True), sub("b", "part b", fork=True))
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=forking)),
            Rule(role="worker", reply=Reply(content="leaf result")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    settings = settings_for(server, max_depth=3, max_total_threads=6)
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "fork everything"})

    threads = result["threads"]
    assert len(threads) == 6  # every slot used, none beyond
    assert max(t["depth"] for t in threads) <= 3
    assert result["metrics"]["threads"] == len(threads)
    ids = {t["id"] for t in threads}
    for thread in threads:  # results fold back up: every nested thread hangs off a parent
        assert (thread["parent"] is None) == (thread["depth"] == 1)
        assert thread["parent"] is None or thread["parent"] in ids
    # Without the cap the fork tree would hold 2 + 4 + 8 threads; the planners that found
    # no slot left answered directly.
    assert len(server.chat_requests("worker")) < 8
    assert result["answer"] == "merged"


async def test_max_depth_stops_forking_even_with_slots_left(make_server: ServerFactory) -> None:
    forking = plan(sub("a", "part a", fork=True), sub("b", "part b", fork=True))
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=forking)),
            Rule(role="worker", reply=Reply(content="leaf")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    result = await compile_apr_graph(
        settings=settings_for(server, max_depth=2, max_total_threads=100)
    ).ainvoke({"task": "fork everything"})
    assert max(t["depth"] for t in result["threads"]) == 2
    assert len(result["threads"]) == 6  # 2 roots + 2 x 2 children, children cannot fork
    assert len(server.chat_requests("planner")) == 3
    assert result["metrics"]["max_depth_reached"] == 2


async def test_dependent_step_starts_when_its_dependency_is_done(
    make_server: ServerFactory,
) -> None:
    steps = plan(
        sub("s1", "find x"), sub("s2", "slow side work"), sub("s3", "use x", depends_on=["s1"])
    )
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=steps)),
            Rule(role="worker", contains="s1: find x", reply=Reply(content="x is 7", delay_s=0.3)),
            Rule(role="worker", contains="s2: slow side", reply=Reply(content="side", delay_s=1.2)),
            Rule(
                role="worker", contains="s3: use x", reply=Reply(content="x + 1 = 8", delay_s=0.1)
            ),
            Rule(role="synthesizer", reply=Reply(content="8, and the side work: side")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})

    s1, s2, s3 = (worker_request(server, g) for g in ("find x", "slow side work", "use x"))
    assert s3.started_at >= s1.ended_at  # after its dependency
    assert s3.started_at < s2.ended_at  # not in waves: the independent step is still running
    assert s1.started_at < s2.ended_at
    assert s2.started_at < s1.ended_at
    assert "x is 7" in s3.last_user_message  # it sees the result it depends on
    assert result["answer"] == "8, and the side work: side"


async def test_cyclic_dependencies_run_in_order_and_unknown_ids_are_dropped(
    make_server: ServerFactory,
) -> None:
    cyclic = plan(
        sub("s1", "first", depends_on=["s2"]),
        sub("s2", "second", depends_on=["s1"]),
        sub("s3", "third", depends_on=["nope"]),
    )
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=cyclic)),
            Rule(role="worker", reply=Reply(content="done", delay_s=0.1)),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    notes = " ".join(result["plan"]["notes"])
    assert "ignored unknown or self dependencies ['nope']" in notes
    assert "cycle" in notes
    first, second, third = (worker_request(server, g) for g in ("first", "second", "third"))
    assert first.ended_at <= second.started_at
    assert second.ended_at <= third.started_at
    assert result["answer"] == "merged"


async def test_race_returns_the_first_verified_result_and_closes_the_rest(
    make_server: ServerFactory,
) -> None:
    racing = plan(
        sub("a", "approach a"), sub("b", "approach b"), sub("c", "approach c"), merge="race"
    )
    slow_words = " ".join(["word"] * 40)
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=racing)),
            Rule(role="worker", contains="approach a", reply=Reply(content="wrong answer")),
            Rule(
                role="worker",
                contains="approach b",
                reply=Reply(content="good answer", chunk_delay_s=0.1),
            ),
            Rule(
                role="worker",
                contains="approach c",
                reply=Reply(content=f"good {slow_words}", chunk_delay_s=0.1),
            ),
        ]
    )
    settings = settings_for(server, max_replacements=0)
    app = compile_apr_graph(settings=settings, verify=lambda answer: "good" in answer)

    started = time.perf_counter()
    result = await app.ainvoke({"task": "race"})
    wall = time.perf_counter() - started

    assert result["answer"] == "good answer"
    assert wall < 2.0  # thread c would have streamed for over 4 s
    statuses = {t["id"]: t["status"] for t in result["threads"]}
    assert statuses == {"a": "failed", "b": "done", "c": "cancelled"}
    assert result["metrics"]["winner"] == "b"
    assert result["metrics"]["threads_cancelled"] == 1
    assert server.chat_requests("synthesizer") == []  # the winner is the answer
    loser = worker_request(server, "approach c")
    # The server notices the hang-up at its next write; unstopped, c would end after 4 s.
    await eventually(lambda: loser.ended_at is not None, "the server to end thread c's request")
    assert loser.status == 499


async def test_race_with_a_verifier_model(make_server: ServerFactory) -> None:
    racing = plan(sub("a", "approach a"), sub("b", "approach b"), merge="race")
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=racing)),
            Rule(role="worker", contains="approach a", reply=Reply(content="A says 5")),
            Rule(
                role="worker",
                contains="approach b",
                reply=Reply(content="B says 6 " + "pad " * 30, chunk_delay_s=0.1),
            ),
            Rule(
                role="synthesizer",
                contains="A says 5",
                reply=Reply(content={"valid": True, "reason": "checks out"}),
            ),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    assert result["answer"] == "A says 5"
    assert {t["id"]: t["verified"] for t in result["threads"]}["a"] is True


async def test_vote_stops_at_a_certain_majority(make_server: ServerFactory) -> None:
    voting = plan(*(sub(f"v{i}", f"solve it, attempt {i}") for i in range(5)), merge="vote")
    slow = "thinking " * 40 + "Final answer: 41"
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=voting)),
            Rule(
                role="worker",
                where=lambda r: re.search(r"attempt [012]\b", r.last_user_message) is not None,
                reply=Reply(content="6*7\nFinal answer: 42"),
            ),
            Rule(role="worker", reply=Reply(content=slow, chunk_delay_s=0.1)),
        ]
    )
    started = time.perf_counter()
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "6*7?"})
    assert time.perf_counter() - started < 2.0
    assert result["answer"] == "42"
    metrics = result["metrics"]
    # The two slow threads were stopped: mid-stream, or before their request went out.
    assert metrics["threads_cancelled"] + metrics["threads_skipped"] == 2
    assert {t["id"] for t in result["threads"] if t["status"] == "done"} == {"v0", "v1", "v2"}
    assert sorted(metrics["votes"].values()) == ["42", "42", "42"]
    # Voters are asked for a final-answer line in their own message (the shared prefix is
    # written before the merge is known).
    assert "Final answer" in worker_request(server, "solve it, attempt 0").messages[-1]["content"]


async def test_settings_can_force_the_merge_strategy(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan(sub("a", "q a"), sub("b", "q b")))),
            Rule(role="worker", reply=Reply(content="Final answer: yes")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server, merge="vote")).ainvoke(
        {"task": "t"}
    )
    assert result["plan"]["merge"] == "vote"
    assert result["answer"] == "yes"
    assert server.chat_requests("synthesizer") == []


async def test_best_lets_a_judge_pick(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(content=plan(sub("a", "draft a"), sub("b", "draft b"), merge="best")),
            ),
            Rule(role="worker", contains="draft a", reply=Reply(content="short draft")),
            Rule(role="worker", contains="draft b", reply=Reply(content="thorough draft")),
            Rule(role="synthesizer", reply=Reply(content={"best": "b", "reason": "more complete"})),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    assert result["answer"] == "thorough draft"
    judge = server.chat_requests("synthesizer")[0].last_user_message
    assert "short draft" in judge
    assert "thorough draft" in judge


async def test_dead_end_is_replaced_by_a_fresh_attempt(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan(sub("a", "tricky"), sub("b", "easy")))),
            Rule(role="worker", contains="rejected", reply=Reply(content="solved differently")),
            Rule(role="worker", contains="tricky", reply=Reply(content="DEAD END: no closed form")),
            Rule(role="worker", reply=Reply(content="easy result")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "t"})
    thread = {t["id"]: t for t in result["threads"]}["a"]
    assert thread["status"] == "done"
    assert thread["attempts"] == 2
    assert thread["answer"] == "solved differently"
    retry = [r for r in server.chat_requests("worker") if "rejected" in r.last_user_message]
    assert "DEAD END: no closed form" in retry[0].last_user_message
    assert "solved differently" in server.chat_requests("synthesizer")[0].last_user_message


async def test_rejected_thread_is_dropped_when_no_replacement_is_left(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan(sub("a", "q a"), sub("b", "q b")))),
            Rule(role="worker", contains="q a", reply=Reply(content="bad")),
            Rule(role="worker", reply=Reply(content="ok fine")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    app = compile_apr_graph(
        settings=settings_for(server, max_replacements=1),
        verify=lambda answer: answer.startswith("ok"),
    )
    result = await app.ainvoke({"task": "t"})
    thread = {t["id"]: t for t in result["threads"]}["a"]
    assert thread["status"] == "failed"
    assert thread["attempts"] == 2
    assert thread["verified"] is False
    assert len([r for r in server.chat_requests("worker") if "q a" in r.last_user_message]) == 2


async def test_each_thread_gets_its_own_token_allowance(make_server: ServerFactory) -> None:
    sized = plan(
        sub("easy", "easy part", max_tokens=20),
        sub("hard", "hard part", max_tokens=100000),
        sub("plain", "plain part"),
    )
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=sized)),
            Rule(role="worker", reply=Reply(content="r")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    await compile_apr_graph(
        settings=settings_for(server, worker_max_tokens=900, min_thread_tokens=64)
    ).ainvoke({"task": "t"})
    allowance = {
        g: worker_request(server, g).body["max_tokens"]
        for g in ("easy part", "hard part", "plain part")
    }
    assert allowance == {"easy part": 64, "hard part": 900, "plain part": 900}


async def test_a_direct_answer_stopped_by_the_deadline_keeps_what_it_wrote(
    make_server: ServerFactory,
) -> None:
    long_text = " ".join(f"word{i}" for i in range(200))
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=long_text, chunk_delay_s=0.02)),
        ]
    )
    settings = settings_for(server, deadline_s=1.0, router=True)
    result = await compile_apr_graph(settings=settings).ainvoke(
        {"task": "Write a short story about a lighthouse keeper."}
    )
    answer = result["answer"]
    assert answer.startswith("(incomplete: the deadline was reached; the answer is cut off)")
    assert "word0 word1 word2" in answer  # streamed to the user, and not taken back
    assert "word199" not in answer
    assert result["metrics"]["completion_tokens"] > 0  # what it wrote counts
    assert [c["mode"] for c in result["calls"]] == ["stopped"]


async def test_deadline_returns_a_partial_answer_on_time(make_server: ServerFactory) -> None:
    long_text = " ".join(["slow"] * 100)
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(
                    content=plan(sub("s1", "quick"), sub("s2", "slow a"), sub("s3", "slow b"))
                ),
            ),
            Rule(role="worker", contains="quick", reply=Reply(content="quick result")),
            Rule(role="worker", reply=Reply(content=long_text, chunk_delay_s=0.05)),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    started = time.perf_counter()
    result = await compile_apr_graph(settings=settings_for(server, deadline_s=1.0)).ainvoke(
        {"task": "t"}
    )
    wall = time.perf_counter() - started
    assert 1.0 <= wall < 2.5  # the slow threads alone would take 5 s
    metrics = result["metrics"]
    assert metrics["incomplete"] is True
    assert metrics["stop_reason"] == "deadline"
    assert metrics["missing"] == ["s2", "s3"]
    answer = result["answer"]
    assert answer.startswith("(incomplete: the deadline was reached; cut off: s2, s3)")
    assert "quick result" in answer
    # What the slow threads wrote by the deadline is given, marked as cut.
    assert "slow a\nslow slow" in answer
    assert "slow b\nslow slow" in answer
    assert answer.count("(cut off here)") == 2
    assert {t["id"]: t["status"] for t in result["threads"]} == {
        "s1": "done",
        "s2": "cancelled",
        "s3": "cancelled",
    }
    assert all(t["completion_tokens"] > 0 for t in result["threads"])  # counted until cut
    assert server.chat_requests("synthesizer") == []


async def test_token_budget_is_not_exceeded_beyond_calls_in_flight(
    make_server: ServerFactory,
) -> None:
    answer = " ".join(["tok"] * 50)
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(content=plan(*(sub(f"s{i}", f"part {i}") for i in range(6)))),
            ),
            Rule(role="worker", reply=Reply(content=answer, delay_s=0.05)),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    budget = 600
    result = await compile_apr_graph(
        settings=settings_for(server, token_budget=budget, max_concurrency=1)
    ).ainvoke({"task": "t"})
    metrics = result["metrics"]
    worker_calls = [c for c in server.chat_requests("worker") if c.status == 200]
    largest_call = max(len(r.all_text.split()) + 50 for r in server.chat_requests("worker"))
    assert metrics["stop_reason"] == "token_budget"
    assert metrics["incomplete"] is True
    assert metrics["budget_tokens_used"] <= budget + largest_call  # one call in flight
    assert len(worker_calls) < 6
    assert metrics["missing"]
    assert server.chat_requests("synthesizer") == []
