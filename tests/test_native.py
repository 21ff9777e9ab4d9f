"""Native parallel reasoners: a scripted model writing ThreadWeaver / Multiverse tags."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from apr_graph import compile_apr_graph
from apr_graph.native import NativeProtocolError
from apr_graph.testing import RecordedRequest, Reply, Rule
from tests.conftest import ServerFactory, settings_for

OPEN = "<|im_start|>assistant\n"


def threadweaver_model(nested: bool) -> Callable[[RecordedRequest], Reply]:
    """Writes a block of two threads; thread 1 opens a nested block of its own if ``nested``."""

    def reply(request: RecordedRequest) -> Reply:
        prompt = request.prompt
        if prompt.endswith(OPEN):
            return Reply(
                content="Two independent parts.\n<Parallel>\n<Outlines>\n"
                "<Outline>1: compute 2+3</Outline>\n"
                "<Outline>2: compute 4*5</Outline>\n</Outlines>\n"
                "<Thread>\n1: (a model that ignores stops would go on)"
            )
        if prompt.endswith("<Thread>\n1:"):
            if nested:
                return Reply(
                    content=" split again\n<Parallel>\n<Outlines>\n"
                    "<Outline>1.1: two</Outline>\n<Outline>1.2: three</Outline>\n"
                    "</Outlines>\n<Thread>\n1.1: 2</Thread>",
                    delay_s=0.2,
                )
            return Reply(content=" 2+3=5</Thread> trailing", delay_s=0.3)
        if prompt.endswith("<Thread>\n1.1: 2</Thread>"):  # past the depth limit
            return Reply(content="<Thread>\n1.2: 3</Thread>")
        if prompt.endswith("<Thread>\n1.2: 3</Thread>"):
            return Reply(content="\n</Parallel> so 2+3=5</Thread>")
        if prompt.endswith("<Thread>\n1.1:"):
            return Reply(content=" got 2</Thread>", delay_s=0.2)
        if prompt.endswith("<Thread>\n1.2:"):
            return Reply(content=" got 3</Thread>", delay_s=0.2)
        if prompt.endswith("1.2: got 3</Thread>\n"):
            return Reply(content="</Parallel> so 2+3=5</Thread>")
        if prompt.endswith("<Thread>\n2:"):
            return Reply(content=" 4*5=20</Thread>", delay_s=0.3)
        if prompt.endswith("</Thread>\n"):
            return Reply(content="</Parallel>\nFinal answer: 5 and 20")
        return Reply(status=400, error_message=f"unscripted prompt end: {prompt[-60:]!r}")

    return reply


async def test_threadweaver_blocks_are_forked_joined_and_continued(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=threadweaver_model(nested=False))])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver"))
    result = await app.ainvoke({"task": "Compute 2+3 and 4*5"})

    assert result["answer"] == "Final answer: 5 and 20"
    reasoning = result["plan"]["reasoning"]
    # ThreadWeaver's join: a newline before the first thread only, threads back to back.
    joined = "</Outlines>\n<Thread>\n1: 2+3=5</Thread><Thread>\n2: 4*5=20</Thread>\n</Parallel>"
    assert joined in reasoning
    assert "would go on" not in reasoning  # the outlines' end stopped the model
    requests = [r for r in server.requests if r.path.endswith("/completions")]
    first, *threads, last = requests
    assert "</Outlines>" in first.body["stop"]
    assert [t.prompt[-11:] for t in threads] == ["<Thread>\n1:", "<Thread>\n2:"] or [
        t.prompt[-11:] for t in threads
    ] == ["<Thread>\n2:", "<Thread>\n1:"]
    assert all("</Thread>" in t.body["stop"] for t in threads)
    assert threads[0].started_at < threads[1].ended_at  # the two threads overlapped
    assert threads[1].started_at < threads[0].ended_at
    assert last.prompt.endswith("4*5=20</Thread>\n")
    assert {t["id"] for t in result["threads"]} == {"b1.1", "b1.2"}
    metrics = result["metrics"]
    assert metrics["model_calls"] == 4
    assert metrics["critical_path_tokens"] < metrics["completion_tokens"]


async def test_nested_blocks_fork_within_the_depth_limit(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=threadweaver_model(nested=True))])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver", max_depth=2))
    result = await app.ainvoke({"task": "Compute 2+3 and 4*5"})
    assert result["answer"] == "Final answer: 5 and 20"
    ids = {t["id"]: t for t in result["threads"]}
    assert set(ids) == {"b1.1", "b1.2", "b1.1/b2.1.1", "b1.1/b2.1.2"}
    assert ids["b1.1/b2.1.1"]["parent"] == "b1.1"
    assert ids["b1.1/b2.1.1"]["depth"] == 2
    assert "1.1: got 2</Thread><Thread>\n1.2: got 3</Thread>" in ids["b1.1"]["answer"]


async def test_past_the_depth_limit_the_model_writes_its_threads_itself(
    make_server: ServerFactory,
) -> None:
    server = make_server([Rule(reply=threadweaver_model(nested=True))])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver", max_depth=1))
    result = await app.ainvoke({"task": "Compute 2+3 and 4*5"})
    thread_requests = [r for r in server.requests if r.prompt.endswith("<Thread>\n1:")]
    assert thread_requests[0].body["stop"] == ["</Thread>"]  # no fork inside a thread
    assert {t["id"] for t in result["threads"]} == {"b1.1", "b1.2"}
    # Issue 16, point 2: the nested block's own </Thread> does not end the outer thread.
    nested = (
        " split again\n<Parallel>\n<Outlines>\n<Outline>1.1: two</Outline>\n"
        "<Outline>1.2: three</Outline>\n</Outlines>\n<Thread>\n1.1: 2</Thread>"
        "<Thread>\n1.2: 3</Thread>\n</Parallel> so 2+3=5"
    )
    assert f"<Thread>\n1:{nested}</Thread><Thread>\n2:" in result["plan"]["reasoning"]
    assert result["answer"] == "Final answer: 5 and 20"


def multiverse_model(request: RecordedRequest) -> Reply:
    prompt = request.prompt
    if prompt.endswith(OPEN):
        return Reply(
            content="<Think>\n<Parallel>\n<Goal>\n<Outline>1: left</Outline>\n"
            "<Outline>2: right</Outline>\n</Goal>"
        )
    if prompt.endswith("<Path>\n1:"):
        return Reply(content=" left is 1</Path>")
    if prompt.endswith("<Path>\n2:"):
        return Reply(content=" right is 2</Path>")
    if prompt.endswith("</Path>\n<Conclusion>\n"):  # the engine opens the conclusion
        return Reply(content="1 and 2\n</Conclusion>\n</Parallel>\n</Think>\n\nAnswer: 3")
    return Reply(status=400, error_message=f"unscripted prompt end: {prompt[-60:]!r}")


async def test_multiverse_paths(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=multiverse_model)])
    app = compile_apr_graph(settings=settings_for(server, native="multiverse"))
    result = await app.ainvoke({"task": "left plus right"})
    assert result["answer"] == "Answer: 3"
    assert (
        "<Path>\n1: left is 1</Path>\n<Path>\n2: right is 2</Path>\n<Conclusion>\n1 and 2"
        in (result["plan"]["reasoning"])
    )


@pytest.mark.parametrize("budget", [{"deadline_s": 0.4}, {"token_budget": 5}])
async def test_native_runs_honour_budgets(
    make_server: ServerFactory, budget: dict[str, float]
) -> None:
    server = make_server([Rule(reply=threadweaver_model(nested=True))])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver", **budget))
    result = await app.ainvoke({"task": "Compute 2+3 and 4*5"})
    assert result["answer"].startswith("(incomplete:")
    assert result["metrics"]["stop_reason"] in {"deadline", "token_budget"}


def one_block_model(outlines: str, thread: Reply) -> Callable[[RecordedRequest], Reply]:
    """Writes one block with ``outlines``; every thread answers ``thread``."""

    def reply(request: RecordedRequest) -> Reply:
        prompt = request.prompt
        if prompt.endswith(OPEN):
            return Reply(content=f"Plan.\n<Parallel>\n<Outlines>\n{outlines}</Outlines>")
        if re.search(r"<Thread>\n[\d.]+:$", prompt):
            return thread
        if prompt.endswith("</Outlines>"):  # no fork: the model goes on by itself
            return Reply(content="\nNo threads after all.\n</Parallel>\n</think>\nDone: 1")
        return Reply(content="</Parallel>\n</think>\nDone: 2")

    return reply


async def test_a_block_without_numbered_outlines_goes_on_sequentially(
    make_server: ServerFactory,
) -> None:
    """Issue 16, point 5: no outline (or none numbered) is no fork, and no crash."""
    model = one_block_model("<Outline>think about it</Outline>\n", Reply(content="x</Thread>"))
    server = make_server([Rule(reply=model)])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver"))
    result = await app.ainvoke({"task": "t"})
    assert result["answer"] == "Done: 1"
    assert result["threads"] == []
    assert result["plan"]["reasoning"].endswith(
        "</Outlines>\nNo threads after all.\n</Parallel>\n</think>\nDone: 1"
    )


async def test_only_numbered_outlines_fork_and_each_number_once(make_server: ServerFactory) -> None:
    """Issue 16, point 9: ``N:`` / ``N.M:`` outlines fork; a repeated number forks once."""
    outlines = (
        "<Outline>1: first</Outline>\n<Outline>1: first again</Outline>\n"
        "<Outline>note: no number</Outline>\n<Outline>2.1: second</Outline>\n"
    )
    server = make_server([Rule(reply=one_block_model(outlines, Reply(content=" ok\n</Thread>")))])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver"))
    result = await app.ainvoke({"task": "t"})
    assert sorted(t["id"] for t in result["threads"]) == ["b1.1", "b1.2.1"]
    assert result["plan"]["blocks"][0]["outlines"] == ["first", "second"]
    assert (
        "</Outlines>\n<Thread>\n1: ok\n</Thread><Thread>\n2.1: ok\n</Thread>\n"
        in (result["plan"]["reasoning"])
    )
    assert result["answer"] == "Done: 2"


async def test_a_thread_that_runs_out_of_tokens_is_cut_not_done(
    make_server: ServerFactory,
) -> None:
    """Issue 16, point 3: a thread cut at ``native_max_tokens`` says so and is closed."""
    long = Reply(content=" " + "".join(f"word{i} " for i in range(40)), finish_reason="length")
    server = make_server([Rule(reply=one_block_model("<Outline>1: a</Outline>\n", long))])
    app = compile_apr_graph(
        settings=settings_for(server, native="threadweaver", native_max_tokens=40)
    )
    result = await app.ainvoke({"task": "t"})
    (thread,) = result["threads"]
    assert thread["status"] == "cancelled"
    assert thread["error"] == "cut at native_max_tokens=40"
    assert "word39 \n</Thread>\n</Parallel>" in result["plan"]["reasoning"]
    bodies = [r.body or {} for r in server.requests if r.path.endswith("/completions")]
    assert bodies[0]["max_tokens"] == 40  # not worker_max_tokens


async def test_a_thread_that_repeats_itself_is_cut_where_its_loop_began(
    make_server: ServerFactory,
) -> None:
    said = " The sum is 12. "
    looping = Reply(content=said + "Let me check it again. " * 200, finish_reason="length")
    server = make_server([Rule(reply=one_block_model("<Outline>1: a</Outline>\n", looping))])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver"))
    result = await app.ainvoke({"task": "t"})
    (thread,) = result["threads"]
    assert thread["status"] == "cancelled"
    assert thread["error"] == "cut where it began repeating itself"
    assert thread["answer"].startswith(said.strip())
    assert thread["answer"].count("check it again") <= 1
    assert result["metrics"]["loops"] == 1


async def test_threadweaver_may_answer_without_a_block_unless_tags_are_required(
    make_server: ServerFactory,
) -> None:
    """Issue 16, point 1: a tagless answer is fine by default for ThreadWeaver (its model may
    not fork), and refused when the run says the model must write tags."""
    server = make_server([Rule(reply=Reply(content="</think>\n4"))])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver"))
    assert (await app.ainvoke({"task": "2+2"}))["answer"] == "4"
    strict = settings_for(server, native="threadweaver", native_require_tags=True)
    with pytest.raises(NativeProtocolError, match="none of its tags"):
        await compile_apr_graph(settings=strict).ainvoke({"task": "2+2"})


async def test_a_thread_that_ends_inside_its_own_block_does_not_loop(
    make_server: ServerFactory,
) -> None:
    """Past the depth limit, a thread that stops writing inside its own block ends there."""

    def reply(request: RecordedRequest) -> Reply:
        if request.prompt.endswith("1.1: y</Thread>"):
            return Reply(content="")  # the model's end of sequence, inside the nested block
        if request.prompt.endswith("<Thread>\n1:"):
            nested = "<Parallel>\n<Outlines>\n<Outline>1.1: x</Outline>\n</Outlines>\n<Thread>"
            return Reply(content=f" {nested}\n1.1: y</Thread>")
        return one_block_model("<Outline>1: a</Outline>\n", Reply())(request)

    server = make_server([Rule(reply=reply)])
    app = compile_apr_graph(settings=settings_for(server, native="threadweaver", max_depth=1))
    result = await app.ainvoke({"task": "t"})
    assert result["answer"] == "Done: 2"
    assert len([r for r in server.requests if r.prompt.endswith("1.1: y</Thread>")]) == 1
