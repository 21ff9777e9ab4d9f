"""A context too long for one request on the server at hand is read in pieces, a thread each,
and merged from their results (``inputs.split_context``)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from apr_graph import compile_apr_graph
from apr_graph.errors import InputError
from apr_graph.inputs import split_context
from apr_graph.settings import AprSettings
from apr_graph.testing import VLLM, LlamaCpp, RecordedRequest, Reply, Rule
from tests.conftest import ServerFactory, settings_for

FACTS = "\n".join(
    f"Fact {i}: the lighthouse number {i} is painted in colour {i}." for i in range(300)
)
TASK = "List every colour the log mentions."
SLOT = 2048  # tokens of one request (llama-server -c 8192 -np 4); the log is ~3,300 words


def seen(request: RecordedRequest) -> int:
    return request.all_text.count("Fact ")


def results(request: RecordedRequest) -> list[str]:
    return [line for line in request.last_user_message.splitlines() if line.endswith("colours")]


def rules() -> list[Rule]:
    return [
        Rule(role="worker", reply=lambda r: Reply(content=f"{seen(r)} colours")),
        Rule(role="synthesizer", reply=lambda r: Reply(content=" + ".join(results(r)))),
    ]


@pytest.mark.parametrize(
    ("as_documents", "server_kind"), [(True, "llama.cpp"), (False, "llama.cpp"), (True, "vllm")]
)
async def test_a_log_longer_than_one_request_is_read_in_pieces(
    make_server: ServerFactory, as_documents: bool, server_kind: str
) -> None:
    # llama.cpp says its per-slot context in /props, vLLM its max_model_len in /v1/models.
    persona = LlamaCpp(n_ctx=SLOT, total_slots=4) if server_kind == "llama.cpp" else None
    server = make_server(rules(), personality=persona or VLLM(max_model_len=SLOT))
    app = compile_apr_graph(settings=settings_for(server))
    context = {"harbour.log": FACTS} if as_documents else FACTS

    result = await app.ainvoke({"task": TASK, "context": context})

    plan = result["plan"]
    assert plan["decision"]["by"] == "length", plan["decision"]
    assert "does not fit one request" in plan["decision"]["reason"]
    workers = server.chat_requests("worker")
    assert plan["pieces"] == len(workers) == len(result["threads"]) >= 2
    # Each thread read its own piece, and together every line, once; the server (which
    # refuses a prompt of SLOT tokens or more) took every request.
    assert sum(seen(r) for r in workers) == 300
    assert all(0 < seen(r) < 300 for r in workers)
    assert not any("DEAD END" in r.system_message for r in workers)  # a piece can be done
    assert server.chat_requests("planner") == []  # no call could have read it all
    (merge,) = server.chat_requests("synthesizer")
    assert seen(merge) == 0  # the results, not the log
    answer = result["answer"]  # the merge's: every thread's result, none added back
    assert all(f"{seen(r)} colours" in answer for r in workers)
    assert answer.count("colours") == len(workers)
    name = "harbour.log" if as_documents else "text"
    assert f"{name} (part 1 of" in result["threads"][0]["goal"]


async def test_a_context_too_long_even_in_pieces_says_what_to_change(
    make_server: ServerFactory,
) -> None:
    server = make_server(rules(), personality=LlamaCpp(n_ctx=SLOT, total_slots=4))
    app = compile_apr_graph(settings=settings_for(server, max_total_threads=2))

    with pytest.raises(InputError, match=r"needs \d+ threads.*allows 2: raise it"):
        await app.ainvoke({"task": TASK, "context": FACTS})
    assert server.chat_requests() == []


async def test_more_pieces_than_max_threads_run_in_waves_the_server_can_take(
    make_server: ServerFactory,
) -> None:
    # max_threads caps a plan the model writes; pieces are cut to fit, and run as the
    # server's slots free up.
    slow = Rule(role="worker", reply=lambda r: Reply(content=f"{seen(r)} colours", delay_s=0.05))
    server = make_server([slow, rules()[1]], personality=LlamaCpp(n_ctx=SLOT, total_slots=2))
    app = compile_apr_graph(settings=settings_for(server, max_threads=2))

    result = await app.ainvoke({"task": TASK, "context": FACTS})

    workers = server.chat_requests("worker")
    assert len(workers) == result["plan"]["pieces"] > 2
    assert sum(seen(r) for r in workers) == 300
    spans = [(r.started_at, r.ended_at or r.started_at) for r in workers]
    most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most <= 2  # never more at once than the server's slots


async def test_a_context_that_fits_is_not_cut(make_server: ServerFactory) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content={"strategy": "direct", "answer": "red"}))],
        personality=LlamaCpp(n_ctx=SLOT, total_slots=4),
    )
    app = compile_apr_graph(settings=settings_for(server))

    result = await app.ainvoke({"task": TASK, "context": FACTS[:2000]})

    assert result["answer"] == "red"
    assert "pieces" not in result["plan"]


async def test_a_context_the_server_refuses_is_then_read_in_pieces(
    make_server: ServerFactory,
) -> None:
    # Long words: at 5 characters a token the log would fit, but the server counts a token a
    # word here and refuses the one call; the run reads it in pieces instead of failing.
    log = "\n".join(f"Fact {i}: a b c d e f g h i j k l m n o p q r s t." for i in range(120))
    server = make_server(rules(), personality=LlamaCpp(n_ctx=SLOT, total_slots=4))
    app = compile_apr_graph(settings=settings_for(server))

    result = await app.ainvoke({"task": TASK, "context": log})

    assert result["plan"]["decision"]["by"] == "length"
    refused = server.chat_requests("planner")
    assert len(refused) == 1  # one request, refused at once (llama.cpp's 400), not retried
    workers = server.chat_requests("worker")
    assert sum(seen(r) for r in workers) == 120
    assert all(0 < seen(r) < 120 for r in workers)


async def test_pieces_held_for_review_and_edited_are_still_merged_from_their_results(
    make_server: ServerFactory,
) -> None:
    server = make_server(rules(), personality=LlamaCpp(n_ctx=SLOT, total_slots=4))
    app = compile_apr_graph(settings=settings_for(server), checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "log"}}
    paused = await app.ainvoke(
        {"task": TASK, "context": FACTS}, config, context={"review_plan": True}
    )
    goals = [s["goal"] for s in paused["__interrupt__"][0].value["plan"]["subtasks"]]

    result = await app.ainvoke(Command(resume=goals[:2]), config)  # the first two parts only

    workers = server.chat_requests("worker")
    assert len(workers) == 2
    assert result["plan"]["pieces"] == 2
    (merge,) = server.chat_requests("synthesizer")  # it fit: the results, not the log
    assert seen(merge) == 0
    assert result["answer"].count("colours") == 2


def test_pieces_are_sized_by_the_server_s_own_count_when_the_text_is_dense() -> None:
    dense = "\n".join("0f 3a 9c 41 " * 10 for _ in range(400))  # 48,400 characters
    settings = AprSettings(base_url="http://127.0.0.1:9/v1", max_threads=32)

    def largest(refused: int) -> int:
        found = split_context(TASK, dense, settings, slot_context=4096, slots=32, refused=refused)
        assert found is not None
        return max(len(text) for text in found[0].values())

    # The server said how many tokens it counted: 2 characters a token, denser than the 3
    # that pieces are sized by otherwise; a piece then holds two thirds as many characters.
    assert largest(refused=24_200) <= largest(refused=0) * 2 / 3 + 121
    assert largest(refused=24_200) / 2 < 4096 * 3 / 4  # its tokens fit, with room to reply


def long_result(words: int) -> Any:
    def reply(request: RecordedRequest) -> Reply:
        shades = " ".join(f"shade{j}-{seen(request)}" for j in range(words))  # all differ: no loop
        return Reply(content=f"{seen(request)} colours: {shades}. In all: {seen(request)}.")

    return reply


def counts(request: RecordedRequest) -> Reply:
    """A merge that keeps what every result it was given found (their counts), in short."""
    found = re.findall(r"\b\d+ colours\b", request.last_user_message)
    return Reply(content=" + ".join(found))


async def stream_run(
    make_server: ServerFactory, worker: Any
) -> tuple[Any, dict[str, Any], list[str]]:
    """A run of ``TASK`` on the log whose threads answer by ``worker`` and whose merges keep
    the counts (a 2,048-token server): the server, the run's last state and its notices."""
    server = make_server(
        [Rule(role="worker", reply=worker), Rule(role="synthesizer", reply=counts)],
        personality=LlamaCpp(n_ctx=SLOT, total_slots=4),
    )
    app = compile_apr_graph(settings=settings_for(server))
    notices, result = [], {}
    async for mode, chunk in app.astream(
        {"task": TASK, "context": FACTS}, stream_mode=["custom", "values"]
    ):
        if mode == "custom" and chunk["event"] == "notice":
            notices.append(chunk["text"])
        elif mode == "values":
            result = chunk
    return server, result, notices


async def test_results_too_long_to_merge_in_one_request_are_merged_in_groups_first(
    make_server: ServerFactory,
) -> None:
    server, result, notices = await stream_run(make_server, long_result(700))

    workers = server.chat_requests("worker")
    assert len(workers) >= 3
    merges = server.chat_requests("synthesizer")
    taken = [r for r in merges if r.status == 200]
    assert len(taken) < len(merges)  # the whole merge was refused, its groups were not
    assert any(r.last_user_message.startswith("These are some of") for r in taken)
    assert taken[-1].last_user_message.startswith("All threads have finished.")
    # Every thread's finding reached the answer through the merges, none added back.
    assert sorted(result["answer"].split(" + ")) == sorted(f"{seen(r)} colours" for r in workers)
    assert any("merging them in groups first" in text for text in notices)
    assert len([c for c in result["calls"] if c["role"] == "synthesizer"]) == len(taken)


async def test_a_result_too_long_to_merge_even_alone_is_given_as_written(
    make_server: ServerFactory,
) -> None:
    server, result, notices = await stream_run(make_server, long_result(2100))

    workers = server.chat_requests("worker")
    assert all(r.status != 200 for r in server.chat_requests("synthesizer"))
    assert result["answer"].count(" colours: ") == len(workers)  # every thread's work kept
    assert any("did not fit one merge request" in text for text in notices)
