"""Tool mode that small models can use: calls written as text, streamed tool calls, the note.

Small instruct models (Qwen2.5-Coder-1.5B on llama.cpp, for one) rarely fill the
``tool_calls`` field: they write the call as a ```json block or between ``<tool_call>`` tags.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.tools import tool

from apr_graph import compile_apr_graph
from apr_graph.chat_model import ChatModelClient
from apr_graph.errors import ModelCallError
from apr_graph.llm import LLMClient
from apr_graph.nodes.tool_loop import read_text_calls, tool_loop, tools_note
from apr_graph.responses import StreamProgress
from apr_graph.sse import StreamEnd
from apr_graph.testing import LlamaCpp, RecordedRequest, Reply, Rule
from tests.conftest import ServerFactory, settings_for
from tests.test_graph import merge_synth


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers exactly.

    Args:
        a: the first factor.
        b: the second factor.
    """
    return a * b


@tool
def lookup_capital(country: str) -> str:
    """The capital of a country."""
    return {"Italy": "Rome", "Kenya": "Nairobi"}[country]


TOOLS = [multiply, lookup_capital]

ONE_THREAD = {
    "strategy": "parallel",
    "subtasks": [{"id": "s1", "goal": "compute 17 * 23 and name the capital of Kenya"}],
}

FENCED_CALL = (
    "I will use the multiply tool.\n"
    '```json\n{"name": "multiply", "arguments": {"a": 17, "b": 23}}\n```'
)

TAGGED_CALLS = (
    '<tool_call>\n{"name": "multiply", "arguments": {"a": 17, "b": 23}}\n</tool_call>\n'
    '<tool_call>\n{"name": "lookup_capital", "arguments": "{\\"country\\": \\"Kenya\\"}"}\n'
    "</tool_call>"
)


def responses_in(request: RecordedRequest) -> list[str]:
    """The user messages of ``request`` that carry tool results written back as text."""
    return [
        m["content"]
        for m in request.messages
        if m.get("role") == "user" and "<tool_response>" in m["content"]
    ]


def text_caller(call: str, answer: str) -> Rule:
    """A worker that writes ``call`` as text, and ``answer`` once it has tool results."""

    def reply(request: RecordedRequest) -> Reply:
        if responses_in(request):
            return Reply(content=answer)
        return Reply(content=call)

    return Rule(role="worker", reply=reply)


def graph_server(make_server: ServerFactory, worker: Rule) -> Any:
    return make_server(
        [Rule(role="planner", reply=Reply(content=ONE_THREAD)), worker, merge_synth()]
    )


# -- calls written as text --------------------------------------------------------------------


async def test_a_call_in_a_json_fence_is_run_and_its_result_reaches_the_model(
    make_server: ServerFactory,
) -> None:
    server = graph_server(make_server, text_caller(FENCED_CALL, "17 * 23 = 391"))
    app = compile_apr_graph(settings=settings_for(server), tools=TOOLS)

    result = await app.ainvoke({"task": "17 * 23, and the capital of Kenya"})

    assert result["threads"][0]["answer"] == "17 * 23 = 391"
    first, second = server.chat_requests("worker")
    # The model's turn goes back as it wrote it, the result as a Qwen/Hermes tool response.
    assert second.messages[-2] == {"role": "assistant", "content": FENCED_CALL}
    assert second.messages[-1] == {
        "role": "user",
        "content": "<tool_response>\n391\n</tool_response>",
    }
    assert second.messages[:-2] == first.messages
    assert second.body["tools"] == first.body["tools"]  # still offered: the limit is not hit


async def test_calls_in_tool_call_tags_are_all_run_in_order(make_server: ServerFactory) -> None:
    server = graph_server(make_server, text_caller(TAGGED_CALLS, "391; Nairobi"))
    events: list[dict[str, Any]] = []
    app = compile_apr_graph(settings=settings_for(server), tools=TOOLS)

    async for event in app.astream({"task": "17 * 23, and Kenya"}, stream_mode="custom"):
        events.append(event)

    second = server.chat_requests("worker")[1]
    assert responses_in(second) == [
        "<tool_response>\n391\n</tool_response>\n<tool_response>\nNairobi\n</tool_response>"
    ]
    used = [(e["tool"], e["ok"]) for e in events if e["event"] == "tool_call"]
    assert used == [("multiply", True), ("lookup_capital", True)]


@pytest.mark.parametrize(
    "answer",
    [
        '{"name": "Rome", "country": "Italy"}',  # a JSON answer that merely has a name
        'Use ```json\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n``` then add the '
        "rest: the total is 6 + 4 = 10, which answers the subtask in full.\nDone.",
    ],
    ids=["name-only", "call-shown-inside-an-answer"],
)
async def test_json_that_is_no_call_is_an_answer(make_server: ServerFactory, answer: str) -> None:
    # (A call to a tool that is not allowlisted is not run either: it is flagged, below.)
    server = graph_server(make_server, Rule(role="worker", reply=Reply(content=answer)))
    app = compile_apr_graph(settings=settings_for(server), tools=TOOLS)

    result = await app.ainvoke({"task": "t"})

    thread = result["threads"][0]
    assert thread["answer"] == answer.strip()
    assert len(server.chat_requests("worker")) == 1
    assert thread["status"] == "done"


def test_text_calls_are_read_in_the_usual_formats() -> None:
    names = ["multiply", "lookup_capital"]
    found = read_text_calls(
        'Sure:\n{"name": "multiply", "parameters": {"a": 2, "b": 3}}\n'
        '{"function": {"name": "lookup_capital", "arguments": {"country": "Italy"}}}',
        names,
    )
    assert [(c["name"], json.loads(c["arguments"])) for c in found.calls] == [
        ("multiply", {"a": 2, "b": 3}),
        ("lookup_capital", {"country": "Italy"}),
    ]
    listed = read_text_calls(
        '```json\n[{"name": "multiply", "arguments": {"a": 1, "b": 2}}]\n```\nThis multiplies.',
        names,
    )
    assert [c["name"] for c in listed.calls] == ["multiply"]
    unclosed_tag = read_text_calls('<tool_call>\n{"name": "multiply", "arguments": {}}', names)
    assert [c["name"] for c in unclosed_tag.calls] == ["multiply"]  # the JSON itself is whole
    assert read_text_calls("The capital is Rome.", names).calls == []


# -- a thread that needed a tool and made no call ----------------------------------------------


class Unlimited:
    """A budget that admits everything and remembers the charges."""

    def __init__(self) -> None:
        self.charged = 0

    def admits(self) -> bool:
        return True

    def charge(self, tokens: int) -> None:
        self.charged += tokens

    def remaining_s(self) -> float | None:
        return None


async def run_loop(server: Any, **overrides: Any) -> Any:
    settings = settings_for(server, **overrides)
    messages = [
        {"role": "system", "content": "shared prefix"},
        {"role": "user", "content": "Subtask s1: 17 * 23"},
    ]
    client = LLMClient(settings)
    try:
        return await tool_loop(client, settings, Unlimited(), "s1", messages, TOOLS, 64)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            Reply(content='```json\n{"name": "search", "arguments": {"q": "x"}}\n```'),
            "a call to search, which is not a tool here (tools: multiply, lookup_capital)",
        ),
        (
            Reply(
                content='```json\n{"name": "multiply", "arguments": {"a": 17,',
                finish_reason="length",
            ),
            "a call to multiply written as text, cut off by the token limit",
        ),
        (
            Reply(content='<tool_call>\n{"name": "multiply", "argu', finish_reason="length"),
            "a call to multiply written as text, cut off by the token limit",
        ),
    ],
    ids=["unknown-tool", "cut-in-a-fence", "cut-in-a-tag"],
)
async def test_a_final_reply_that_is_an_unrun_call_is_flagged(
    make_server: ServerFactory, reply: Reply, expected: str
) -> None:
    server = make_server([Rule(reply=reply)])

    completion = await run_loop(server)

    assert completion.unrun_tool_call == expected
    assert completion.finish_reason == reply.finish_reason  # "length" stays: a cut thread
    assert completion.text == reply.text()
    assert len(server.chat_requests()) == 1


async def test_a_text_call_past_the_limit_is_flagged(make_server: ServerFactory) -> None:
    server = make_server([Rule(reply=Reply(content=FENCED_CALL))])

    completion = await run_loop(server, max_tool_calls=1)

    assert completion.unrun_tool_call == "a call to multiply after the limit of 1 tool calls"
    # Run; told once that the limit is reached; still a call: flagged.
    assert [bool(r.body.get("tools")) for r in server.chat_requests()] == [True, False, False]
    told = responses_in(server.chat_requests()[-1])[-1]
    assert "not run: the limit of 1 tool calls is reached; answer now" in told


async def test_a_model_told_the_limit_is_reached_answers_with_what_it_has(
    make_server: ServerFactory,
) -> None:
    # A question of three lookups under a limit of two (Qwen2.5-Coder-1.5B asked for the
    # third): the third call is answered "answer now", and the model answers.
    server = make_server(
        [
            Rule(reply=Reply(content=FENCED_CALL), times=3),
            Rule(reply=Reply(content="17 * 23 = 391; the third was not looked up")),
        ]
    )

    completion = await run_loop(server, max_tool_calls=2)

    assert completion.unrun_tool_call is None
    assert completion.text == "17 * 23 = 391; the third was not looked up"
    requests = server.chat_requests()
    assert [bool(r.body.get("tools")) for r in requests] == [True, True, False, False]
    assert responses_in(requests[-1])[-1].endswith("reached; answer now\n</tool_response>")


async def test_a_thread_whose_text_call_is_cut_is_not_done_without_an_error(
    make_server: ServerFactory,
) -> None:
    cut = Reply(
        content='```json\n{"name": "multiply", "arguments": {"a": 17,', finish_reason="length"
    )
    server = graph_server(make_server, Rule(role="worker", reply=cut))
    app = compile_apr_graph(settings=settings_for(server), tools=TOOLS)

    result = await app.ainvoke({"task": "17 * 23"})

    thread = result["threads"][0]
    assert len(server.chat_requests("worker")) == 2  # one retry with twice the room
    assert thread["status"] != "done" or (thread["error"] or "").startswith("truncated")


async def test_an_api_call_cut_mid_arguments_is_flagged_not_run(
    make_server: ServerFactory,
) -> None:
    cut = Reply(
        tool_calls=[{"name": "multiply", "arguments": '{"a": 17, "b'}], finish_reason="length"
    )
    server = make_server([Rule(reply=cut)])

    completion = await run_loop(server)

    assert completion.finish_reason == "length"
    assert completion.unrun_tool_call == "a call to multiply cut off by the token limit"
    assert len(server.chat_requests()) == 1


# -- the note ----------------------------------------------------------------------------------


async def test_threads_are_told_which_tools_exist_in_their_last_message(
    make_server: ServerFactory,
) -> None:
    server = graph_server(make_server, Rule(role="worker", reply=Reply(content="391")))
    app = compile_apr_graph(settings=settings_for(server), tools=TOOLS)

    await app.ainvoke({"task": "17 * 23"})

    request = server.chat_requests("worker")[0]
    note = tools_note(TOOLS)
    assert request.messages[-1]["role"] == "user"
    assert request.messages[-1]["content"].endswith("\n\n" + note)
    assert all(note not in m["content"] for m in request.messages[:-1])  # prefix untouched
    assert note == (
        "Tools you can call:\n"
        "- multiply: Multiply two integers exactly.\n"
        "- lookup_capital: The capital of a country.\n"
        "Call a tool when the subtask needs information or computation it provides; "
        "reply with the answer otherwise."
    )
    assert "when the task needs" in tools_note(TOOLS, unit="task")


async def test_threads_with_tools_are_told_to_call_them_not_offered_a_dead_end(
    make_server: ServerFactory,
) -> None:
    # Offered "DEAD END", a 1.5B model answered every lookup of a stock count with
    # "DEAD END: ... not provided in the context" instead of calling the tool.
    plan = {"strategy": "parallel", "merge": "synthesize", "subtasks": ["17 * 23", "Kenya"]}
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", reply=Reply(content="found")),
            merge_synth(),
        ]
    )
    await compile_apr_graph(settings=settings_for(server), tools=TOOLS).ainvoke({"task": "q"})
    workers = server.chat_requests("worker")
    system = workers[0].messages[0]["content"]
    assert "DEAD END" not in system
    assert "call the tool: never guess" in system
    # One shared prefix for the threads and the merge, as without tools.
    prefixes = {r.messages[0]["content"] for r in [*workers, *server.chat_requests("synthesizer")]}
    assert prefixes == {system}

    plain = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", reply=Reply(content="found")),
            merge_synth(),
        ]
    )
    await compile_apr_graph(settings=settings_for(plain)).ainvoke({"task": "q"})
    assert "DEAD END" in plain.chat_requests("worker")[0].messages[0]["content"]


async def test_a_goal_written_as_a_tool_call_is_run_without_the_model(
    make_server: ServerFactory,
) -> None:
    # Told which tools exist, a 1.5B planner wrote the goals "stock_level(bolts)", ...; its
    # threads then guessed the numbers instead of calling the tool.
    plan = {
        "strategy": "parallel",
        "merge": "concat",
        "subtasks": ["multiply(17, 23)", "lookup_capital(Kenya)", "lookup_capital(Atlantis)"],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", reply=Reply(content="I cannot look up Atlantis.")),
        ]
    )
    events: list[dict[str, Any]] = []
    app = compile_apr_graph(settings=settings_for(server), tools=TOOLS)
    async for mode, chunk in app.astream({"task": "q"}, stream_mode=["custom", "values"]):
        if mode == "custom":
            events.append(chunk)
        else:
            result = chunk
    answers = {t["goal"]: t["answer"] for t in result["threads"]}
    assert answers["multiply(17, 23)"] == "391"
    assert answers["lookup_capital(Kenya)"] == "Nairobi"
    # A call that fails (KeyError) is no answer: that thread asks the model as usual.
    assert answers["lookup_capital(Atlantis)"] == "I cannot look up Atlantis."
    (worker,) = server.chat_requests("worker")  # the one model call: the failed lookup's
    assert "lookup_capital(Atlantis)" in worker.last_user_message
    calls = [(e["tool"], e["ok"]) for e in events if e.get("event") == "tool_call"]
    assert sorted(calls) == [
        ("lookup_capital", False),
        ("lookup_capital", True),
        ("multiply", True),
    ]


# -- streamed tool calls -----------------------------------------------------------------------


def api_caller(request: RecordedRequest) -> Reply:
    """A worker that asks for two calls at once through the tools API, then answers."""
    results = [m["content"] for m in request.messages if m.get("role") == "tool"]
    if results:
        return Reply(content=f"17 * 23 = {results[0]}; the capital is {results[1]}")
    return Reply(
        content="Let me look these up.",
        tool_calls=[
            {"name": "multiply", "arguments": {"a": 17, "b": 23}},
            {"name": "lookup_capital", "arguments": {"country": "Kenya"}},
        ],
    )


async def test_streamed_tool_calls_are_assembled_and_run(make_server: ServerFactory) -> None:
    server = graph_server(make_server, Rule(role="worker", reply=api_caller))
    app = compile_apr_graph(settings=settings_for(server), tools=TOOLS)

    result = await app.ainvoke({"task": "17 * 23, and Kenya"})

    assert result["threads"][0]["answer"] == "17 * 23 = 391; the capital is Nairobi"
    first, second = server.chat_requests("worker")
    assert [first.body["stream"], second.body["stream"]] == [True, True]
    asked = second.messages[-3]
    assert (asked["role"], asked["content"]) == ("assistant", "Let me look these up.")
    assert [(c["id"], c["function"]["name"]) for c in asked["tool_calls"]] == [
        ("call_0", "multiply"),
        ("call_1", "lookup_capital"),
    ]
    assert json.loads(asked["tool_calls"][1]["function"]["arguments"]) == {"country": "Kenya"}
    assert [(m["tool_call_id"], m["content"]) for m in second.messages[-2:]] == [
        ("call_0", "391"),
        ("call_1", "Nairobi"),
    ]


def test_tool_call_deltas_are_joined_by_index() -> None:
    end = StreamEnd()
    progress = StreamProgress()
    chunks = [
        [{"index": 0, "id": "a", "type": "function", "function": {"name": "mul", "arguments": ""}}],
        [{"index": 1, "id": "b", "function": {"name": "lookup_capital", "arguments": '{"co'}}],
        [{"index": 0, "id": "a", "function": {"name": "tiply", "arguments": '{"a": '}}],
        [{"index": 1, "function": {"name": "lookup_capital", "arguments": 'untry": "Kenya"}'}}],
        [{"index": 0, "function": {"arguments": "2, "}}, {"index": 0, "function": {}}],
        [{"index": 0, "function": {"arguments": '"b": 3}'}}],
        ["junk"],
    ]
    for deltas in chunks:
        for _ in range(end.add_call_deltas(deltas)):
            progress.add_call_piece()

    assert end.tool_calls == (
        {"id": "a", "name": "multiply", "arguments": '{"a": 2, "b": 3}'},
        {"id": "b", "name": "lookup_capital", "arguments": '{"country": "Kenya"}'},
    )
    assert progress.completion_tokens == 7  # tokens, though not text
    assert progress.text == ""


def test_whole_calls_without_an_index_are_taken_by_position() -> None:
    end = StreamEnd()
    end.add_call_deltas(
        [
            {"id": "x", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}},
            {"id": "y", "function": {"name": "lookup_capital", "arguments": "{}"}},
        ]
    )
    assert [(c["id"], c["name"], c["arguments"]) for c in end.tool_calls] == [
        ("x", "multiply", '{"a": 2, "b": 3}'),
        ("y", "lookup_capital", "{}"),
    ]


async def test_tool_calls_stream_tokens_like_other_threads(make_server: ServerFactory) -> None:
    server = graph_server(make_server, Rule(role="worker", reply=api_caller))
    app = compile_apr_graph(settings=settings_for(server, stream_tokens=True), tools=TOOLS)

    events = [e async for e in app.astream({"task": "17 * 23, and Kenya"}, stream_mode="custom")]

    text = "".join(e["text"] for e in events if e["event"] == "token" and e["id"] == "s1")
    assert text == "Let me look these up.17 * 23 = 391; the capital is Nairobi"


async def test_a_slow_tool_call_is_given_the_streamed_timeout(make_server: ServerFactory) -> None:
    # Each chunk comes within the timeout, the whole reply does not: streamed, that is fine.
    slow = Reply(content="one two three four five six", chunk_delay_s=0.15)
    server = graph_server(make_server, Rule(role="worker", reply=slow))
    app = compile_apr_graph(settings=settings_for(server, request_timeout_s=0.5), tools=TOOLS)

    result = await app.ainvoke({"task": "t"})

    assert result["threads"][0]["answer"] == "one two three four five six"


async def test_a_langchain_chat_model_streams_tool_calls(make_server: ServerFactory) -> None:
    from langchain_openai import ChatOpenAI

    server = make_server(
        [  # a chat model sends no role header: the rules go by the messages
            Rule(contains="Subtask ", reply=api_caller),
            Rule(contains="All threads have finished", reply=Reply(content="merged")),
            Rule(reply=Reply(content=ONE_THREAD)),
        ]
    )
    model = ChatOpenAI(base_url=server.base_url, api_key="k", model="test-model", max_retries=0)
    client = ChatModelClient(model, settings_for(server))
    app = compile_apr_graph(client=client, tools=TOOLS)

    result = await app.ainvoke({"task": "17 * 23, and Kenya"})

    with_tools = [r for r in server.chat_requests() if r.body.get("tools")]
    assert [r.body.get("stream") for r in with_tools] == [True, True]
    assert result["threads"][0]["answer"] == "17 * 23 = 391; the capital is Nairobi"
    # langchain-openai keeps the model's HTTP client in a global cache; its connections
    # were opened on this test's loop, so they are closed here, before that loop stops
    await model.root_async_client.close()
    await client.aclose()


async def test_a_server_that_cannot_stream_tools_is_asked_unstreamed(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=ONE_THREAD)),
            Rule(role="worker", reply=api_caller),
            merge_synth(),
        ],
        personality=LlamaCpp(tool_streams=False),
    )
    app = compile_apr_graph(settings=settings_for(server), tools=TOOLS)

    result = await app.ainvoke({"task": "17 * 23, and Kenya"})

    assert result["threads"][0]["answer"] == "17 * 23 = 391; the capital is Nairobi"
    sent = [(r.body.get("stream", False), r.status) for r in server.chat_requests("worker")]
    assert sent == [(True, 500), (False, 200), (False, 200)]  # refused once, then remembered


# -- a direct answer with tools -----------------------------------------------------------------


DIRECT_PLAN = {"strategy": "direct", "answer": None, "subtasks": []}


def direct_caller(call: str, answer: str) -> list[Rule]:
    """A planner that plans a direct answer without writing it, and a direct answer that
    writes ``call`` as text, then ``answer`` once it has the tool's result."""

    def reply(request: RecordedRequest) -> Reply:
        return Reply(content=answer if responses_in(request) else call)

    return [
        Rule(role="planner", pattern="You are the planner", reply=Reply(content=DIRECT_PLAN)),
        Rule(role="planner", reply=reply),
    ]


async def test_a_task_answered_directly_may_call_the_tools(make_server: ServerFactory) -> None:
    # "How many bolts, nuts and gears are in stock?" was read as one piece by the router and
    # answered by a call without the tools: "There are 10 bolts, 15 nuts, and 20 gears".
    server = make_server(direct_caller(FENCED_CALL, "17 * 23 = 391"))
    events: list[dict[str, Any]] = []
    app = compile_apr_graph(settings=settings_for(server, router=True), tools=TOOLS)

    async for mode, chunk in app.astream(
        {"task": "Write what 17 times 23 is"}, stream_mode=["custom", "values"]
    ):
        if mode == "custom":
            events.append(chunk)
        else:
            result = chunk

    # The router would call this one piece; with tools, the planner (told of them) decides.
    assert result["plan"]["decision"]["by"] == "model"
    assert result["answer"] == "17 * 23 = 391"
    planning, first, second = server.chat_requests("planner")
    assert "multiply" in planning.messages[0]["content"]  # the planner is told of the tools
    assert [t["function"]["name"] for t in first.body["tools"]] == ["multiply", "lookup_capital"]
    assert "Call a tool when the task needs" in first.messages[-1]["content"]
    assert responses_in(second) == ["<tool_response>\n391\n</tool_response>"]
    assert [(e["id"], e["tool"], e["ok"]) for e in events if e["event"] == "tool_call"] == [
        ("direct", "multiply", True)
    ]
    assert result["metrics"]["model_calls"] == 2  # the plan, and the answer's two requests
    assert not server.chat_requests("worker")


async def test_a_direct_answer_that_is_an_unrun_call_is_an_error(
    make_server: ServerFactory,
) -> None:
    server = make_server(direct_caller(FENCED_CALL, "unused"))
    server.rules[-1] = Rule(role="planner", reply=Reply(content=FENCED_CALL))
    app = compile_apr_graph(settings=settings_for(server, max_tool_calls=1), tools=TOOLS)
    with pytest.raises(ModelCallError, match="did not answer: its reply was a call to multiply"):
        await app.ainvoke({"task": "Write what 17 times 23 is"})
    # The plan; the call run once; told the limit is reached; a call again: refused.
    assert len(server.chat_requests("planner")) == 4


@pytest.mark.parametrize(
    "text",
    [
        # Qwen2.5-Coder-1.5B on llama.cpp, as written (its template shows calls in {{ }}):
        '{{"name": "multiply", "arguments": {"a": 17, "b": 23}}}\nFinal answer: 400',
        '{{"name": "multiply", "arguments": {"a": 17, "b": 23}}}}',
        '<tool_call>\n{{"name": "multiply", "arguments": {"a": 17, "b": 23}}}\n</tool_call>',
    ],
)
def test_a_call_in_the_doubled_braces_of_qwens_template_is_read(text: str) -> None:
    found = read_text_calls(text, ["multiply"])
    assert [(c["name"], json.loads(c["arguments"])) for c in found.calls] == [
        ("multiply", {"a": 17, "b": 23})
    ]


def test_doubled_braces_that_do_not_close_doubled_are_no_call() -> None:
    assert read_text_calls('{{"name": "multiply", "arguments": {}}', ["multiply"]).calls == []
