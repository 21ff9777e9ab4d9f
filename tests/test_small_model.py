"""What a real small model (Qwen2.5-Coder-1.5B-Instruct on llama.cpp) did to runs, replayed.

The replies below are the model's own, quoted from the runs that broke (issue 14): threads
giving up at the end of a reply, every thread concluding "no solution", a merge that dropped
two of three parts, a planner repeating one goal.
"""

from __future__ import annotations

import re

import pytest

from apr_graph import compile_apr_graph
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer
from tests.conftest import ServerFactory, settings_for

COUNTDOWN = "Use the numbers [7, 1, 8, 100] and + - * / to make exactly 100."


def approaches(*goals: str) -> dict[str, object]:
    """A plan that tries ``goals`` side by side (ids s1, s2, ...), merged by a call."""
    subtasks = [{"id": f"s{i}", "goal": goal} for i, goal in enumerate(goals, 1)]
    return {"strategy": "parallel", "merge": "synthesize", "subtasks": subtasks}


async def test_every_thread_concluding_no_solution_is_the_answer(
    make_server: ServerFactory,
) -> None:
    plan = approaches(
        "Try combinations that start from 100", "Try combinations that start from 7 * 8"
    )
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(
                role="worker",
                contains="start from 100",
                reply=Reply(
                    content="DEAD END: No combination of the numbers [7, 1, 8, 100] starting "
                    "from 100 gives exactly 100 with every number used."
                ),
            ),
            Rule(
                role="worker",
                reply=Reply(
                    content="7 * 8 = 56, 56 + 100 = 156, 156 - 1 = 155 ...\n"
                    "None of these reach 100.\nDEAD END: no expression from 7 * 8 reaches 100."
                ),
            ),
            Rule(
                role="synthesizer",
                contains="cannot be done",
                reply=Reply(content="There is no solution: no expression makes exactly 100."),
            ),
        ]
    )
    settings = settings_for(server, max_replacements=0)
    result = await compile_apr_graph(settings=settings).ainvoke({"task": COUNTDOWN})
    assert result["answer"] == "There is no solution: no expression makes exactly 100."
    threads = {t["id"]: t for t in result["threads"]}
    assert threads["s2"]["status"] == "failed"  # the DEAD END on its last line was seen
    assert threads["s2"]["error"] == "dead end: no expression from 7 * 8 reaches 100."
    merge = server.chat_requests("synthesizer")[0].last_user_message
    assert "no expression from 7 * 8 reaches 100" in merge


async def test_one_approach_found_and_the_rest_dead_ends_is_merged_without_a_call(
    make_server: ServerFactory,
) -> None:
    plan = approaches(
        "Try combinations that start from 100",
        "Try combinations that start from 7 * 8",
        "Try combinations that start from 8 - 1",
    )
    found = "100 - 8 = 92, 92 + 7 = 99, 99 + 1 = 100.\nFinal answer: 100 - 8 + 7 + 1"
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", contains="start from 100", reply=Reply(content=found)),
            Rule(
                role="worker",
                contains="start from 7 * 8",
                reply=Reply(content="7 * 8 = 56 ...\nDEAD END: no expression from 7 * 8 works."),
            ),
            Rule(
                role="worker",
                reply=Reply(content="DEAD END: 8 - 1 = 7 leaves 7, 1, 100: no way to 100."),
            ),
            Rule(role="synthesizer", reply=Reply(content="merged by a call")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": COUNTDOWN})
    assert server.chat_requests("synthesizer") == []  # nothing to merge: no call
    head, body = result["answer"].split("\n\n", 1)
    assert body == f"Try combinations that start from 100\n{found}"  # the result under its goal
    assert "s2, s3" in head
    assert "cannot be done" in head
    statuses = {t["id"]: t["status"] for t in result["threads"]}
    assert statuses == {"s1": "done", "s2": "failed", "s3": "failed"}
    assert len(server.chat_requests("worker")) == 5  # each dead end had its one replacement


async def test_one_answer_beside_a_failed_call_is_still_merged(make_server: ServerFactory) -> None:
    plan = approaches(
        "Try combinations that start from 100", "Try combinations that start from 7 * 8"
    )
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", contains="start from 100", reply=Reply(content="100 * 1")),
            Rule(role="worker", reply=Reply(status=400, error_message="bad request")),
            Rule(role="synthesizer", reply=Reply(content="100 * 1, and s2 did not answer")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": COUNTDOWN})
    # A thread that failed is not a conclusion: the merge call is told and answers.
    assert result["answer"] == "100 * 1, and s2 did not answer"
    assert len(server.chat_requests("synthesizer")) == 1


async def test_a_replacement_is_told_what_failed(make_server: ServerFactory) -> None:
    plan = {
        "strategy": "parallel",
        "merge": "synthesize",
        "subtasks": [{"id": "s1", "goal": "70 - 47"}],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(
                role="worker",
                times=1,
                reply=Reply(
                    content="DEAD END: The operation 70 - 47 cannot be performed directly."
                ),
            ),
            Rule(role="worker", reply=Reply(content="70 - 47 = 23")),
            Rule(role="synthesizer", reply=Reply(content="23")),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "70 - 47?"})
    assert result["answer"] == "23"
    retry = server.chat_requests("worker")[1].last_user_message
    assert "cannot be performed directly" in retry
    assert "different approach" in retry


async def test_a_merge_that_drops_parts_gets_them_back(make_server: ServerFactory) -> None:
    task = (
        "Answer all three: (a) What is the largest ocean on Earth? (b) What is 17 * 23? "
        "(c) What is the chemical symbol of gold?"
    )
    plan = {
        "strategy": "parallel",
        "merge": "synthesize",
        "subtasks": [
            {"id": "s1", "goal": "What is the largest ocean on Earth?"},
            {"id": "s2", "goal": "What is 17 * 23?"},
            {"id": "s3", "goal": "What is the chemical symbol of gold?"},
        ],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(
                role="worker",
                contains="ocean",
                reply=Reply(content="The largest ocean on Earth is the Pacific Ocean."),
            ),
            Rule(
                role="worker",
                contains="17 * 23",
                reply=Reply(content="17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391"),
            ),
            Rule(
                role="worker",
                contains="gold",
                reply=Reply(content="The chemical symbol of gold is Au."),
            ),
            Rule(
                role="synthesizer",
                reply=Reply(
                    content="The final answer to the task is:\n\n"
                    "The largest ocean on Earth is the Pacific Ocean."
                ),
            ),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    events = [e async for e in app.astream({"task": task}, stream_mode="custom")]
    result = await app.ainvoke({"task": task})
    answer = result["answer"]
    assert answer.startswith("The final answer to the task is:")
    for part in ("Pacific", "391", "Au"):
        assert part in answer
    assert answer.count("Pacific Ocean") == 1  # a part the merge kept is not repeated
    assert [e["lost"] for e in events if e["event"] == "merge_incomplete"] == [["s2", "s3"]]


async def test_a_merge_that_drops_a_short_answer_without_numbers_or_names_gets_it_back(
    make_server: ServerFactory,
) -> None:
    # What transformers serve's 1.5B merge did: part (2), "Carbon dioxide", was gone, and
    # nothing said so (no number to look for, and its only capital is its first word).
    task = (
        "Answer three questions: (1) What is the capital of Australia? (2) Which gas do "
        "plants take in for photosynthesis? (3) What is 17 times 23?"
    )
    plan = {"strategy": "parallel", "merge": "synthesize", "subtasks": ["(1)", "(2)", "(3)"]}
    answers = {"Australia": "Canberra", "photosynthesis": "Carbon dioxide", "17 times": "391"}
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            *(
                Rule(role="worker", contains=asked, reply=Reply(content=f"Final answer: {said}"))
                for asked, said in answers.items()
            ),
            Rule(
                role="synthesizer",
                reply=Reply(content="The capital of Australia is Canberra. 17 times 23 is 391."),
            ),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    events = [e async for e in app.astream({"task": task}, stream_mode="custom")]
    lost = [e["lost"] for e in events if e["event"] == "merge_incomplete"]
    assert lost == [["s2"]]
    result = await app.ainvoke({"task": task})
    assert "Carbon dioxide" in result["answer"]
    assert result["answer"].count("Canberra") == 1


async def test_a_planner_repeating_one_goal_gets_a_vote_of_different_attempts(
    make_server: ServerFactory,
) -> None:
    goal = "Find an expression with [7, 1, 8, 100] that makes exactly 100"
    plan = {
        "strategy": "parallel",
        "merge": "synthesize",
        "subtasks": [{"id": f"s{i}", "goal": goal} for i in range(1, 5)],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(
                role="worker",
                reply=Reply(content="(8 - 7) * 100 * 1\nFinal answer: (8 - 7) * 100 * 1"),
            ),
        ]
    )
    # The whole plan first: a thread started early, before its goal proved repeated, would be
    # discarded and sent again, and could still be answered.
    settings = settings_for(server, stream_plan=False)
    result = await compile_apr_graph(settings=settings).ainvoke({"task": COUNTDOWN})
    assert result["plan"]["merge"] == "vote"
    assert result["answer"] == "(8 - 7) * 100 * 1"
    workers = server.chat_requests("worker")
    assert len({w.last_user_message for w in workers}) == len(workers)  # no two alike
    temperatures = sorted(w.body["temperature"] for w in workers)
    assert temperatures[0] == 0.0
    assert temperatures[-1] == 0.7
    assert all(re.search(r"Final answer", w.last_user_message) for w in workers)


async def test_the_planner_is_told_the_tools_and_an_unrun_call_is_no_answer(
    make_server: ServerFactory,
) -> None:
    from langchain_core.tools import tool

    @tool
    def capital(country: str) -> str:
        """Look up the capital city of a country."""
        return {"Italy": "Rome", "Kenya": "Nairobi"}.get(country, "unknown")

    plan = {
        "strategy": "parallel",
        "merge": "concat",
        "subtasks": ["Capital of Italy, with capital", "Capital of Kenya, with capital"],
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", contains="Kenya", reply=Reply(content="Nairobi")),
            # What the 1.5B model wrote: a call, as text, to a tool that does not exist here.
            Rule(
                role="worker",
                reply=Reply(
                    content='```json\n{"name": "lookup", "arguments": {"q": "Italy"}}\n```'
                ),
            ),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server), tools=[capital])
    result = await app.ainvoke({"task": "What are the capitals of Italy and Kenya?"})
    planner = server.chat_requests("planner")[0].messages[0]["content"]
    assert "- capital: Look up the capital city of a country." in planner
    thread = next(t for t in result["threads"] if t["id"] == "s1")
    assert thread["status"] == "failed"  # never reported as an answer
    assert "not an answer" in (thread["error"] or "")
    assert "lookup" in (thread["error"] or "")
    assert "(no answer: rejected: the reply was not an answer" in result["answer"]
    assert "Nairobi" in result["answer"]


LABELLED = "Answer each part: (a) What is 23 + 58? (b) What is the capital of Japan?"


def labelled_server(make_server: ServerFactory, plan: dict[str, object]) -> ScriptedServer:
    return make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            Rule(role="worker", contains="23 + 58", reply=Reply(content="23 + 58 = 81")),
            Rule(role="worker", contains="capital of Japan", reply=Reply(content="Tokyo")),
        ]
    )


def goal_schema(request: RecordedRequest) -> dict[str, object]:
    schema = request.body["response_format"]["json_schema"]["schema"]
    items: dict[str, object] = schema["anyOf"][1]["properties"]["subtasks"]["items"]
    return items


async def test_a_task_that_labels_its_parts_is_planned_by_label(
    make_server: ServerFactory,
) -> None:
    # A 1.5B planner copied every part into its goal (~70 tokens for three short questions,
    # 5 s on 2 CPU cores before the first thread could start); named by label, a plan is
    # a few tokens per part and each thread still gets its part's text.
    plan = {"strategy": "parallel", "merge": "concat", "subtasks": ["(a)", "(b)"]}
    server = labelled_server(make_server, plan)
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": LABELLED})
    planner = server.chat_requests("planner")[0]
    assert goal_schema(planner) == {"type": "string", "enum": ["(a)", "(b)"]}
    assert "The task labels its parts (a), (b)." in planner.last_user_message
    assert [s["goal"] for s in result["plan"]["subtasks"]] == [
        "(a) What is 23 + 58?",
        "(b) What is the capital of Japan?",
    ]
    assert result["answer"] == (
        "(a) What is 23 + 58?\n23 + 58 = 81\n\n(b) What is the capital of Japan?\nTokyo"
    )
    # The planner's system message is the one every task gets (one cached prefix).
    unlabelled = labelled_server(make_server, {"strategy": "direct", "answer": "8"})
    await compile_apr_graph(settings=settings_for(unlabelled)).ainvoke({"task": "What is 5+3?"})
    other = unlabelled.chat_requests("planner")[0]
    assert other.messages[0] == planner.messages[0]
    assert goal_schema(other) == {"type": "string", "maxLength": 600}
    assert "labels its parts" not in other.last_user_message


@pytest.mark.parametrize("case", ["setting off", "tools", "more parts than threads"])
async def test_goals_are_written_out_when_labels_cannot_name_them(
    make_server: ServerFactory, case: str
) -> None:
    from langchain_core.tools import tool

    @tool
    def capital(country: str) -> str:
        """Look up the capital city of a country."""
        return "Tokyo"

    plan = {"strategy": "parallel", "merge": "concat", "subtasks": ["23 + 58", "capital(Japan)"]}
    server = labelled_server(make_server, plan)
    overrides = {
        "setting off": {"label_goals": False},
        "more parts than threads": {"max_threads": 1},
    }
    settings = settings_for(server, **overrides.get(case, {}))
    app = compile_apr_graph(settings=settings, tools=[capital] if case == "tools" else [])
    await app.ainvoke({"task": LABELLED})
    planner = server.chat_requests("planner")[0]
    assert goal_schema(planner) == {"type": "string", "maxLength": 600}
    assert "labels its parts" not in planner.last_user_message


async def test_a_direct_answer_is_written_after_its_working(make_server: ServerFactory) -> None:
    # Asked for the answer alone, the 1.5B model answered "What is 84 + 55?" with "149";
    # with a working field first in the schema, "84 + 55 = 139" and then "139".
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(
                    content={"strategy": "direct", "working": "84 + 55 = 139", "answer": "139"}
                ),
            )
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke(
        {"task": "What is 84 + 55?"}
    )
    assert result["answer"] == "139"
    assert result["plan"]["working"] == "84 + 55 = 139"
    assert result["metrics"]["model_calls"] == 1
    schema = server.chat_requests("planner")[0].body["response_format"]["json_schema"]["schema"]
    direct = schema["anyOf"][0]
    assert list(direct["properties"]) == ["strategy", "working", "answer"]
    assert direct["required"] == ["strategy", "working", "answer"]


async def test_a_direct_plan_without_working_still_answers(make_server: ServerFactory) -> None:
    # Servers that ignore the schema (or models that skip a field) still get their answer.
    server = make_server(
        [Rule(role="planner", reply=Reply(content={"strategy": "direct", "answer": "Paris"}))]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke(
        {"task": "What is the capital of France?"}
    )
    assert result["answer"] == "Paris"
    assert "working" not in result["plan"]


async def test_a_merge_that_keeps_a_numbered_list_s_last_item_is_not_told_it_lost_it(
    make_server: ServerFactory,
) -> None:
    # A 1.5B merge of a file listing kept "JSONArray" as a bullet; the thread had it as item
    # 6, and "6" (the item's number, read as its result) was not in the merge: added back.
    plan = {"strategy": "parallel", "merge": "synthesize", "subtasks": ["decoder", "glob"]}
    listing = {
        "decoder": "Defined:\n1. JSONDecoder: decodes JSON text.\n2. JSONArray: parses an array.",
        "glob": "Defined:\n1. glob: finds paths matching a pattern.",
    }
    merged = (
        "- `JSONDecoder`: decodes JSON text.\n- `JSONArray`: parses an array.\n"
        "- `glob`: finds paths matching a pattern."
    )
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan)),
            *(
                Rule(role="worker", contains=goal, reply=Reply(content=text))
                for goal, text in listing.items()
            ),
            Rule(role="synthesizer", reply=Reply(content=merged)),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    events = [e async for e in app.astream({"task": "List what is defined"}, stream_mode="custom")]
    assert [e for e in events if e["event"] == "merge_incomplete"] == []
