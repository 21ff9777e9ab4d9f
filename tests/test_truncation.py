"""A thread cut off by its token limit is continued once from where it stopped, with the same
allowance (a tool thread is tried again with twice the room), and, if cut again, reaches the
merge marked as incomplete: never as a whole answer."""

from __future__ import annotations

from apr_graph import compile_apr_graph
from apr_graph.testing import LlamaCpp, Reply, Rule
from tests.conftest import ServerFactory, settings_for
from tests.test_graph import merge_synth, parallel_plan

PLAN = {
    "strategy": "parallel",
    "subtasks": [{"id": "s1", "goal": "multiply 17 by 23", "max_tokens": 100}],
}


async def test_a_cut_thread_is_continued_where_it_stopped_with_the_same_room(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=PLAN)),
            Rule(
                role="worker",
                times=1,
                reply=Reply(content="17 * 23 = 17 * 20 + 17 * 3", finish_reason="length"),
            ),
            # The model restarts the sentence it was cut in: the repeat is not kept twice.
            Rule(role="worker", reply=Reply(content="17 * 20 + 17 * 3 = 340 + 51 = 391")),
            Rule(role="synthesizer", reply=Reply(content="391")),
        ]
    )
    settings = settings_for(server, min_thread_tokens=16)  # the plan's 100 stands
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "17*23?"})
    workers = server.chat_requests("worker")
    assert [w.body["max_tokens"] for w in workers if w.body] == [100, 100]
    again = workers[1].messages
    assert again[:2] == workers[0].messages  # the same prefix: a server's cache holds it
    assert again[2] == {"role": "assistant", "content": "17 * 23 = 17 * 20 + 17 * 3"}
    assert again[3]["role"] == "user"
    assert "Continue exactly where you stopped" in again[3]["content"]
    thread = result["threads"][0]
    assert (thread["status"], thread["error"]) == ("done", None)
    assert thread["answer"] == "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391"
    assert thread["attempts"] == 2


async def test_a_thread_cut_twice_reaches_the_merge_marked_incomplete(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=PLAN)),
            Rule(role="worker", reply=Reply(content="17 * 23 = 17 * 20 +", finish_reason="length")),
            Rule(role="synthesizer", reply=Reply(content="merged")),
        ]
    )
    settings = settings_for(server, min_thread_tokens=16)
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "17*23?"})
    assert len(server.chat_requests("worker")) == 2  # one continuation, not more
    thread = result["threads"][0]
    assert thread["status"] == "truncated"  # never reported as done
    assert thread["answer"] == "17 * 23 = 17 * 20 +"  # a continuation that repeats adds nothing
    assert thread["error"] == "truncated: cut off at its 200-token limit"
    merge = server.chat_requests("synthesizer")[0].last_user_message
    assert "this result is incomplete: truncated" in merge


async def test_the_plan_cannot_give_a_thread_less_than_the_floor(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=PLAN)),
            Rule(role="worker", reply=Reply(content="17 * 23 = 391")),
            Rule(role="synthesizer", reply=Reply(content="391")),
        ]
    )
    await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "17*23?"})
    assert server.chat_requests("worker")[0].body["max_tokens"] == 256  # not the plan's 100


async def test_a_thread_cut_by_the_servers_context_is_not_retried_with_more_room(
    make_server: ServerFactory,
) -> None:
    # llama.cpp with 4 slots of a small context: the allowance is lowered to what the slot
    # leaves after the prompt, and a reply cut there would be cut there again with any
    # allowance (a 1.5B model's review threads were retried at 2,048 and cut at ~450 again).
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=parallel_plan(2))),
            Rule(role="worker", reply=Reply(content="17 * 23 = 17 * 20 +", finish_reason="length")),
            merge_synth(),
        ],
        personality=LlamaCpp(n_ctx=700, total_slots=4),
    )
    settings = settings_for(server, worker_max_tokens=1024, stream_plan=False)
    result = await compile_apr_graph(settings=settings).ainvoke({"task": "t"})
    workers = server.chat_requests("worker")
    assert len(workers) == 2  # one request per thread: no retry with twice the room
    assert all(r.body and r.body["max_tokens"] < 1024 for r in workers)
    for thread in result["threads"]:
        assert thread["status"] == "truncated"
        assert "the server's context left room for" in (thread["error"] or "")
