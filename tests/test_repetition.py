"""A reply that repeats itself is stopped soon after its loop starts, not given more room.

The scripted workers write their result and then one phrase over and over until their
``max_tokens`` (``finish_reason: length``), as a small model that loops does.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from apr_graph import compile_apr_graph, loops
from apr_graph.loops import (
    ITEM_REPEATS,
    MAX_PERIOD_WORDS,
    SENTENCE_REPEATS,
    SHORT_ITEM_RUN,
    LoopDetector,
)
from apr_graph.testing import RecordedRequest, Reply, Rule
from tests.conftest import ServerFactory, settings_for

PHRASE = "Let me check the code again to be sure. "
ALLOWANCE = 400
CUT_WITHIN = 300
"""Tokens (words, as the scripted server counts them) a loop may stream before it is cut."""

FILES = ["calculator.py", "dataset.py", "sample.py"]


def finding(goal: str) -> str:
    """A thread's real result: a few sentences about its file (~45 words)."""
    name = next((f for f in FILES if f in goal), goal)
    return (
        f"Findings for {name}, most serious first. One: divide() does not guard against a "
        "zero divisor and raises at run time. Two: the loader opens files without closing "
        "them. Three: the names x1 and tmp2 say nothing about what they hold. "
    )


def looping(result: str, *, delay_s: float = 0.001) -> Any:
    """A reply factory: ``result``, then ``PHRASE`` until the request's ``max_tokens``."""

    def reply(request: RecordedRequest) -> Reply:
        limit = int((request.body or {}).get("max_tokens") or ALLOWANCE)
        words = (result + PHRASE * limit).split()[:limit]
        return Reply(content=" ".join(words), finish_reason="length", chunk_delay_s=delay_s)

    return reply


def review_plan(merge: str = "concat") -> dict[str, Any]:
    return {
        "strategy": "parallel",
        "merge": merge,
        "subtasks": [f"Review {name}" for name in FILES],
    }


def dataset_requests(server: Any) -> list[RecordedRequest]:
    return [r for r in server.chat_requests("worker") if "dataset.py" in r.last_user_message]


def loop_start(request: RecordedRequest) -> int:
    """Words the worker streamed before its loop began."""
    return len(finding(request.last_user_message).split())


def events_of(chunks: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [chunk for mode, chunk in chunks if mode == "custom"]


async def run(app: Any, task: str, **inputs: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Stream a run of ``task`` (and other ``inputs``): its last state and its events."""
    values: dict[str, Any] = {}
    events: list[dict[str, Any]] = []
    stream = app.astream({"task": task, **inputs}, stream_mode=["custom", "values"])
    async for mode, chunk in stream:
        if mode == "values":
            values = chunk
        else:
            events.append(chunk)
    return values, events


async def test_looping_threads_are_cut_soon_after_the_loop_starts_and_keep_their_result(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=review_plan())),
            Rule(role="worker", reply=lambda r: looping(finding(r.last_user_message))(r)),
        ]
    )
    settings = settings_for(server, worker_max_tokens=ALLOWANCE, stream_plan=False)
    result, events = await run(compile_apr_graph(settings=settings), "Review three files")

    workers = server.chat_requests("worker")
    assert len(workers) == 3  # no retry with twice the room, no fresh attempt either
    assert {r.body["max_tokens"] for r in workers if r.body} == {ALLOWANCE}
    for request in workers:
        assert request.streamed - loop_start(request) <= CUT_WITHIN, request.streamed
        assert request.streamed < ALLOWANCE  # the client closed the stream; the server stopped
    for thread in result["threads"]:
        assert thread["status"] == "done"
        assert thread["answer"].startswith(finding(thread["goal"]).strip())
        assert thread["answer"].count("check the code again") <= 1
        assert thread["looped"]["at_tokens"] > 0
        assert thread["looped"]["attempts"] == 1
    for name in FILES:
        assert f"Findings for {name}" in result["answer"]
    assert result["metrics"]["loops"] == 3
    assert result["metrics"]["loop_saved_tokens"] > 0
    looped = [e for e in events if e["event"] == "thread_looped"]
    assert sorted(e["id"] for e in looped) == ["s1", "s2", "s3"]
    assert all(e["saved_tokens"] > 0 for e in looped)


async def test_a_thread_that_loops_before_saying_anything_gets_one_fresh_attempt(
    make_server: ServerFactory,
) -> None:
    fresh = "The file is fine: nothing to report."
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=review_plan())),
            Rule(role="worker", contains="repeating itself", reply=Reply(content=fresh)),
            Rule(role="worker", contains="dataset.py", reply=looping("Hmm. ")),
            Rule(role="worker", reply=lambda r: Reply(content=finding(r.last_user_message))),
        ]
    )
    settings = settings_for(server, worker_max_tokens=ALLOWANCE, stream_plan=False)
    result, events = await run(compile_apr_graph(settings=settings), "Review three files")

    mine = dataset_requests(server)
    assert len(mine) == 2  # the loop, and one fresh attempt at the same room
    assert [r.body["max_tokens"] for r in mine if r.body] == [ALLOWANCE, ALLOWANCE]
    assert "repeating itself" in mine[1].last_user_message
    assert [r.body["temperature"] for r in mine if r.body] == [0.0, 0.4]
    thread = next(t for t in result["threads"] if "dataset.py" in t["goal"])
    assert thread["answer"] == fresh
    assert thread["attempts"] == 2
    assert [e["event"] for e in events if e.get("id") == thread["id"]].count("thread_retry") == 1


def dataset_loops_at_once() -> list[Rule]:
    """The thread of dataset.py loops before saying anything, every time; the others answer."""
    return [
        Rule(role="planner", reply=Reply(content=review_plan())),
        Rule(role="worker", contains="dataset.py", reply=looping("Hmm. ")),
        Rule(role="worker", reply=lambda r: Reply(content=finding(r.last_user_message))),
    ]


async def test_a_thread_that_loops_again_is_not_tried_a_third_time(
    make_server: ServerFactory,
) -> None:
    server = make_server(dataset_loops_at_once())
    settings = settings_for(server, worker_max_tokens=ALLOWANCE, stream_plan=False)
    result, _ = await run(compile_apr_graph(settings=settings), "Review three files")

    mine = dataset_requests(server)
    assert len(mine) == 2
    assert all(r.streamed <= CUT_WITHIN for r in mine)
    thread = next(t for t in result["threads"] if "dataset.py" in t["goal"])
    assert thread["looped"]["attempts"] == 2
    assert result["metrics"]["loops"] == 2


async def test_no_fresh_attempt_when_the_budget_has_no_room_for_it(
    make_server: ServerFactory,
) -> None:
    server = make_server(dataset_loops_at_once())
    settings = settings_for(
        server, worker_max_tokens=ALLOWANCE, stream_plan=False, token_budget=ALLOWANCE * 2
    )
    await run(compile_apr_graph(settings=settings), "Review three files")
    mine = dataset_requests(server)
    assert len(mine) == 1


async def test_a_looping_merge_is_cut_and_what_it_said_before_is_the_answer(
    make_server: ServerFactory,
) -> None:
    summary = "All three files divide without a zero check; dataset.py also leaks files. "
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=review_plan("synthesize"))),
            Rule(role="worker", reply=lambda r: Reply(content=finding(r.last_user_message))),
            Rule(role="synthesizer", reply=looping(summary)),
        ]
    )
    settings = settings_for(server, synthesizer_max_tokens=ALLOWANCE, stream_plan=False)
    result, _ = await run(compile_apr_graph(settings=settings), "Review three files")

    merge = server.chat_requests("synthesizer")
    assert len(merge) == 1
    assert merge[0].streamed - len(summary.split()) <= CUT_WITHIN
    assert result["answer"].startswith(summary.strip())
    assert result["answer"].count("check the code again") <= 1
    assert result["metrics"]["loops"] == 1


def direct_plan() -> Rule:
    return Rule(
        role="planner",
        where=lambda r: "response_format" in (r.body or {}),
        reply=Reply(content={"strategy": "direct", "answer": None}),
    )


def direct_requests(server: Any) -> list[RecordedRequest]:
    return [r for r in server.chat_requests("planner") if "response_format" not in r.body]


async def test_a_direct_answer_that_loops_after_its_answer_is_cut_and_kept(
    make_server: ServerFactory,
) -> None:
    said = (
        "Paris is the capital of France. It stands on the Seine, in the north of the country, "
        "and has been the seat of its kings, then of its republics, for most of a thousand "
        "years. About two million people live in the city itself and over twelve million in "
        "its region, which makes it one of the largest metropolitan areas in Europe, home "
        "to the Louvre, the Eiffel Tower and many universities. "
    )
    server = make_server([direct_plan(), Rule(role="planner", reply=looping(said))])
    settings = settings_for(server, planner_max_tokens=ALLOWANCE, worker_max_tokens=ALLOWANCE // 2)
    result, events = await run(compile_apr_graph(settings=settings), "Capital of France?")
    direct = direct_requests(server)
    assert len(direct) == 1  # it looped after an eighth of its allowance: no fresh attempt
    assert direct[0].streamed - len(said.split()) <= CUT_WITHIN
    assert result["answer"].startswith(said.strip())
    assert result["answer"].count("check the code again") <= 1
    assert not [e for e in events if e["event"] == "answer_retry"]


async def test_a_direct_answer_that_loops_at_once_is_asked_again_and_told_why(
    make_server: ServerFactory,
) -> None:
    first = "Python: pros: easy to learn. "
    whole = "Python is easy to learn; Rust is fast and safe; Go compiles quickly."
    server = make_server(
        [
            direct_plan(),
            Rule(role="planner", contains="repeating itself", reply=Reply(content=whole)),
            Rule(role="planner", reply=looping(first)),
        ]
    )
    settings = settings_for(server, planner_max_tokens=ALLOWANCE, worker_max_tokens=ALLOWANCE // 2)
    result, events = await run(
        compile_apr_graph(settings=settings), "Pros and cons of Python, Rust and Go?"
    )
    direct = direct_requests(server)
    assert len(direct) == 2
    assert [r.body["max_tokens"] for r in direct] == [ALLOWANCE, ALLOWANCE]
    assert "repeating itself after about" in direct[1].last_user_message
    assert result["answer"] == whole  # the first attempt's text is gone
    retries = [e for e in events if e["event"] == "answer_retry"]
    assert len(retries) == 1
    assert 0 < retries[0]["at_tokens"] < ALLOWANCE // 8
    assert [r.body["temperature"] for r in direct] == [0.0, 0.4]  # the retry samples
    assert result["metrics"]["loops"] == 1
    assert result["metrics"]["model_calls"] == 3  # the plan and two attempts


async def test_a_direct_answer_that_loops_twice_is_not_asked_a_third_time(
    make_server: ServerFactory,
) -> None:
    server = make_server([direct_plan(), Rule(role="planner", reply=looping("Hmm. "))])
    settings = settings_for(server, planner_max_tokens=ALLOWANCE)
    result, _ = await run(compile_apr_graph(settings=settings), "Pros and cons of Go?")
    assert len(direct_requests(server)) == 2
    assert result["metrics"]["loops"] == 2
    assert result["answer"].startswith("Hmm.")


async def test_no_fresh_direct_attempt_with_retry_loops_off(make_server: ServerFactory) -> None:
    server = make_server([direct_plan(), Rule(role="planner", reply=looping("Hmm. "))])
    settings = settings_for(server, planner_max_tokens=ALLOWANCE, retry_loops=False)
    await run(compile_apr_graph(settings=settings), "Pros and cons of Go?")
    assert len(direct_requests(server)) == 1


async def test_a_looping_plan_written_without_a_schema_is_cut_and_asked_again(
    make_server: ServerFactory,
) -> None:
    # A server that takes no response_format: the schema is in the prompt and nothing
    # bounds the reply. (A reply constrained by the schema is bounded by it: never cut.)
    looping_plan = '{"strategy": "direct", "working": "' + "I think that " * ALLOWANCE
    server = make_server(
        [
            Rule(
                role="planner",
                times=1,
                reply=Reply(content=looping_plan, finish_reason="length", chunk_delay_s=0.001),
            ),
            Rule(role="planner", reply=Reply(content={"strategy": "direct", "answer": "4"})),
        ]
    )
    settings = settings_for(server, planner_max_tokens=ALLOWANCE, structured_output="prompt")
    result, _ = await run(compile_apr_graph(settings=settings), "2 + 2?")
    first, second = server.chat_requests("planner")
    assert first.streamed <= CUT_WITHIN
    assert "repeating itself" in second.last_user_message
    assert result["answer"] == "4"


async def test_a_plan_constrained_by_its_schema_is_never_cut(make_server: ServerFactory) -> None:
    same = {"strategy": "direct", "answer": "4", "subtasks": [{"id": "x", "goal": "junk"}] * 10}
    server = make_server([Rule(role="planner", reply=Reply(content=same))])
    result, _ = await run(compile_apr_graph(settings=settings_for(server)), "2 + 2?")
    assert result["answer"] == "4"
    assert result["metrics"]["loops"] == 0


async def test_stop_loops_off_lets_a_reply_run_to_its_limit(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=review_plan())),
            Rule(
                role="worker", reply=lambda r: looping(finding(r.last_user_message), delay_s=0)(r)
            ),
        ]
    )
    settings = settings_for(
        server, worker_max_tokens=ALLOWANCE, stream_plan=False, stop_loops=False
    )
    result, _ = await run(compile_apr_graph(settings=settings), "Review three files")
    assert all("looped" not in t for t in result["threads"])
    assert result["metrics"]["loops"] == 0


# -- the detector on its own ----------------------------------------------------------------


def feed(text: str, step: int = 7) -> tuple[Any, int]:
    """Feed ``text`` in pieces; the loop found and the characters fed when it was."""
    detector = LoopDetector()
    for start in range(0, len(text), step):
        found = detector.feed(text[start : start + step])
        if found is not None:
            return found, start + step
    return None, len(text)


@pytest.mark.parametrize("period", [1, 2, 5, 12, 19, 20, 40, 80, 150, 290])
def test_a_block_repeated_back_to_back_is_found_within_300_words(period: int) -> None:
    block = " ".join(f"w{i}" for i in range(period)) + " "
    before = "An honest start of an answer that says something first. "
    text = before + block * (1 + math.ceil(600 / period))
    found, fed = feed(text)
    assert found is not None
    assert text[: found.keep] == before + block  # the block said once is kept
    streamed_after_start = len(text[len(before + block) : fed].split())
    assert streamed_after_start <= CUT_WITHIN


def test_a_list_that_repeats_its_items_under_new_numbers_is_a_loop() -> None:
    items = [
        "**Bug**: The `mean` function does not handle the case where the list is empty.",
        "**Bug**: The `clear` function does not correctly clear the history list.",
        "**Bug**: The `round2` function does not handle the case where the input is text.",
    ]
    numbered = "".join(f"{n}. {items[(n - 1) % 3]}\n\n" for n in range(1, 40))
    found, fed = feed("Findings for calculator.py:\n\n" + numbered)
    assert found is not None
    kept = ("Findings for calculator.py:\n\n" + numbered)[: found.keep]
    assert kept.count("**Bug**") == 3  # each finding once
    assert fed < len("Findings for calculator.py:\n\n" + numbered) // 2


def test_a_cycle_of_many_findings_is_a_loop() -> None:
    """Seen on a 1.5B model: eight findings of one pattern, over and over (a 200-word block)."""
    names = ["std", "evaluate", "last", "median", "round2", "clear", "main", "mean"]
    item = (  # no sentence comes back word for word outside the cycle (see the next test)
        "**Bug**: The `{0}` function does not handle division by zero, which can lead to "
        "runtime errors. `{0}` should include checks to avoid this."
    )
    start = "Findings:\n\n1. **Risky Code**: `calc` does not check its divisor.\n\n"
    numbered = "".join(f"{n}. {item.format(names[(n - 2) % 8])}\n\n" for n in range(2, 60))
    found, fed = feed(start + numbered)
    assert found is not None
    assert found.period_words <= MAX_PERIOD_WORDS
    kept = (start + numbered)[: found.keep]
    # Cut as its template came back (ITEM_REPEATS), before the cycle does.
    assert [kept.count(f"The `{name}` function") for name in names] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert "Risky Code" in kept
    assert fed < len(start + numbered) // 4


def test_a_list_that_runs_away_with_one_sentence_in_every_item_is_a_loop() -> None:
    """Seen on a 1.5B model: new items, each ending with the same sentence, to the limit."""
    places = ["History", "Science", "Fine Arts", "Nature", "Design", "Music", "Film", "Toys"]
    item = (
        "**Visit the Tokyo Museum of {0}**: This is a popular museum and a great place to "
        "see {0}. It's also a great place to take photos of the city."
    )
    start = "Tips for Tokyo:\n\n"
    text = start + "".join(f"{n}. {item.format(p)}\n\n" for n, p in enumerate(places, 1))
    found, fed = feed(text)
    assert found is not None
    assert found.repeats == SENTENCE_REPEATS
    kept = text[: found.keep]
    assert kept.count("It's also a great place") == SENTENCE_REPEATS - 1
    assert kept.rstrip().endswith("see Design.")  # cut where the sentence comes the 5th time
    assert "Music" not in text[:fed]  # found as it was said


def test_a_sentence_said_in_code_or_short_or_four_times_is_no_loop() -> None:
    line = "    raise ValueError('the column does not exist in this dataset')\n"
    code = "```python\n" + "".join(f"def f{i}(x):\n{line}" for i in range(12)) + "```\n"
    assert feed(code)[0] is None
    words = [
        "apple",
        "pear",
        "plum",
        "fig",
        "kiwi",
        "lime",
        "date",
        "peach",
        "grape",
        "melon",
        "mango",
        "guava",
        "lemon",
    ]
    short = "".join(f"- {word} is in the basket. Done and dusted.\n" for word in words)
    assert feed(short)[0] is None
    four = "".join(
        f"{n}. The `{name}` function reads text. If the value is not numeric, it will raise "
        "a ValueError.\n"
        for n, name in enumerate(["get", "sample", "filter", "mean"], 1)
    )
    assert feed(four + "That is all.\n")[0] is None


PROS = ["easy to learn", "a large ecosystem", "cross-platform code"]
USES = "web development, data analysis, machine learning, scientific computing, automation"
RUNAWAY = [f"Good for {use.strip()}" for use in USES.split(",")] + [
    f"Good for {topic} usage" for topic in ["speed", "memory", "disk", "network", "testing"]
]


def test_a_list_of_short_items_that_open_alike_is_cut_at_its_tenth() -> None:
    items = [*PROS, *RUNAWAY, "Good for storage usage", "Good for CPU usage"]
    text = "Python:\nPros:\n" + "".join(f"- {item}\n" for item in items)
    found, _ = feed(text)
    assert found is not None
    kept = text[: found.keep]
    assert kept.count("- Good for") == SHORT_ITEM_RUN - 1
    assert kept.endswith("- Good for network usage\n")


def test_nine_short_items_that_open_alike_or_a_new_list_are_no_loop() -> None:
    nine = "".join(f"- {item}\n" for item in RUNAWAY[: SHORT_ITEM_RUN - 1])
    assert feed(f"Pros:\n{nine}\nCons:\n{nine}")[0] is None  # a bold or new list starts afresh
    varied = "".join(f"- {item}\n" for item in [*RUNAWAY[:5], *PROS, *RUNAWAY[5:]])
    assert feed(varied)[0] is None
    two_words = "".join(
        f"- Supports {fmt}\n" for fmt in ["JSON", "YAML", "TOML", "XML", "CSV", "INI", "HCL"]
    )
    assert feed(two_words * 2)[0] is None  # "Supports JSON" says no more than its opening


def test_no_kept_reply_runs_away_in_short_items(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reply in ``data/decision/runs`` is cut where it was before the rule came."""
    root = Path(__file__).resolve().parents[1] / "data" / "decision" / "runs"
    replies: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, str) and key in ("answer", "text", "content", "result"):
                    replies.add(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in sorted(root.glob("*.json")):
        walk(json.loads(path.read_text()))
    lists = [r for r in replies if r.count("\n- ") + r.count("\n1. ") >= 1]
    assert len(lists) > 200
    now = [feed(reply, step=40)[0] for reply in lists]
    monkeypatch.setattr(loops, "SHORT_ITEM_RUN", 10**9)
    before = [feed(reply, step=40)[0] for reply in lists]
    assert now == before


def test_ordinary_text_and_code_are_not_loops() -> None:
    root = Path(__file__).resolve().parents[1]
    sources = [*sorted(root.glob("apr_graph/**/*.py")), *sorted(root.glob("*.md"))]
    assert len(sources) > 40
    found = {str(p.relative_to(root)): feed(p.read_text())[0] for p in sources}
    assert {name: loop for name, loop in found.items() if loop is not None} == {}
    table = "| n | n squared |\n|---|---|\n" + "".join(f"| {i} | {i * i} |\n" for i in range(200))
    assert feed(table)[0] is None
    steps = "".join(f"{n}. Add {n} to the total and write the new total down.\n" for n in range(60))
    assert feed(steps)[0] is None


# -- a list that runs away: one template, new names ------------------------------------------

METHODS = ["to_json", "__repr__", "__eq__", "__hash__", "__lt__", "__len__", "__iter__", "copy"]


def runaway_list(limit: int = 10_000) -> str:
    """A review that lists one claim for method after method (as a 1.5B model did, to its
    token limit): each item new by its names, the same by everything else."""
    head = (
        "Findings for orders.py, most serious first:\n\n1. **Unchecked total**: `Order.total` "
        "adds prices as strings, so two items of 5 give 55 instead of 10; convert them first.\n\n"
    )
    item = (
        "{n}. **Missing `{m}` method**: The `Order` class does not have a `{m}` method, which "
        "makes it hard to work with orders. It is good practice to add a `{m}` method that "
        "behaves as Python expects of `{m}`.\n\n"
    )
    items = [item.format(n=n, m=METHODS[(n - 2) % len(METHODS)]) for n in range(2, 200)]
    return " ".join((head + "".join(items)).split(" ")[:limit])


def test_a_list_of_one_claim_about_name_after_name_is_cut_at_its_third_repeat() -> None:
    text = runaway_list()
    found, fed = feed(text)
    assert found is not None
    kept = text[: found.keep]
    assert "Unchecked total" in kept
    assert [kept.count(f"a `{m}` method that") for m in METHODS[:4]] == [1, 1, 1, 0]
    assert kept.endswith("\n\n")
    assert text[found.keep :].startswith("5. **Missing `__hash__`")
    assert found.repeats == ITEM_REPEATS + 1
    assert fed < text.index("6. **Missing") + 10  # found as the sixth item began


def test_a_list_that_alternates_two_templates_is_cut() -> None:
    # One claim for function after function, in two wordings, with a new finding between
    # (as a 1.5B model wrote on a review): no three items in a row repeat one template.
    claim = {
        "A": "The function `{f}` is supposed to return {w} of a given text, but it is currently "
        "returning a list with the first letter of each word capitalized. This is not the "
        "intended behavior. The correct implementation should return {w} without capitals.",
        "B": "The function `{f}` is supposed to return {w} of a given text, but it is currently "
        "returning an empty string if the text is empty. This is not the intended behavior. The "
        "correct implementation should return {w} if the text is not empty.",
    }
    items = [
        (
            "N",
            "word_count",
            "subtracts one from the number of words, so a text of three words "
            "counts two; drop the `- 1`.",
        ),
        ("A", "words", "the words"),
        ("B", "longest_word", "the longest word"),
        ("A", "unique_words", "the unique words"),
        ("B", "shortest_word", "the shortest word"),
        (
            "N",
            "top_share",
            "divides by the number of distinct words instead of all words, so "
            "shares add up to more than one; divide by `len(words(text))`.",
        ),
        ("A", "capitalised", "the capitalised words"),
        ("B", "lexical_diversity", "the lexical diversity"),
    ]
    text = "Findings for textstats.py:\n\n" + "".join(
        f"{n}. **`{f}`**: " + (w if kind == "N" else claim[kind].format(f=f, w=w)) + "\n\n"
        for n, (kind, f, w) in enumerate(items, 1)
    )
    found, _ = feed(text)
    assert found is not None
    kept = text[: found.keep]
    assert "drop the `- 1`" in kept
    assert "divide by `len(words(text))`" in kept
    assert text[found.keep :].startswith("7. **`capitalised`**")
    assert found.repeats == ITEM_REPEATS + 1


def test_a_template_that_says_its_names_in_words_is_cut() -> None:
    # The name's words said again in prose ("`unique_words` ... the unique words") make every
    # item look new by its 4-grams; they read as the name does.
    names = {
        "words": "the words of the text",
        "most_common": "the most common words",
        "unique_words": "the unique words of the text",
        "longest_word": "the longest word there",
        "shortest_word": "the shortest word there",
        "lexical_diversity": "the lexical diversity measure",
        "capitalised_words": "the capitalised words found",
    }
    text = "Findings for textstats.py:\n\n" + "".join(
        f"{n}. **Bug in `{name}` function**: The function `{name}` is supposed to return {said}, "
        f"but it currently returns {said} in descending order. This is incorrect because the "
        f"problem statement says {said} should be returned in ascending order.\n\n"
        for n, (name, said) in enumerate(names.items(), 1)
    )
    found, _ = feed(text)
    assert found is not None
    assert text[found.keep :].startswith("5. **Bug in `shortest_word`")
    assert found.repeats == ITEM_REPEATS + 1


def test_a_long_list_of_new_names_costs_linear_time() -> None:
    # Every item brings a name, whose words earlier items are read again with: against all of
    # them, 8,000 items took seconds; against the last ITEM_MEMORY, a fraction of one.
    letters = [chr(97 + i % 26) + chr(97 + i // 26 % 26) + chr(97 + i // 676) for i in range(8000)]
    text = "".join(f"- `name_{i}_{word}`\n" for i, word in enumerate(letters))
    started = time.process_time()
    assert feed(text, step=20)[0] is None
    assert time.process_time() - started < 5.0


def test_lists_whose_items_share_a_shape_but_say_new_things_are_no_loop() -> None:
    functions = [
        ("words", "a string", "its words in lower case"),
        ("sentences", "a string", "its sentences, stripped"),
        ("average_length", "a list of sentences", "their mean length in words"),
        ("longest_word", "a string", "the longest of its words"),
        ("shortest_word", "a string", "the shortest of its words"),
        ("top_share", "a string and a count n", "the share of its n most common words"),
        ("capitalised", "a string", "the words that begin with a capital letter"),
        ("lexical_diversity", "a string", "distinct words over all words"),
        ("summary", "a string", "a dictionary of the figures above"),
    ]
    usage = "Usage of textstats.py:\n\n" + "".join(
        f"{n}. **{name}(text)**:\n   - This function takes {arg} as input and returns {out}.\n"
        f'   - Example usage:\n     ```python\n     text = "Hello, world! This is a test."\n'
        f"     print({name}(text))\n     ```\n\n"
        for n, (name, arg, out) in enumerate(functions, 1)
    )
    assert feed(usage)[0] is None
    steps = "".join(
        f"{n}. The {day} day she picked {n * 40} apples, so {200 - n * 40} apples were left "
        f"on the tree at the end of the {day} day of picking.\n\n"
        for n, day in enumerate(["first", "second", "third", "fourth", "fifth"], 1)
    )
    assert feed(steps)[0] is None
    sections = "".join(
        f"### {name}\n\n1. **Risky code**: `{name}` opens its file without closing it, which "
        "leaks a handle on every call of the function.\n\n2. **Unclear names**: the "
        f"variables `x` and `tmp` in `{name}` say nothing about what they hold here.\n\n"
        for name in ["load.py", "save.py", "merge.py", "split.py", "clean.py"]
    )
    assert feed(sections)[0] is None
    documented = (
        "Functions of textstats.py:\n\n"
        "1. `word_count(text)` returns the number of words in `text`, counting hyphenated "
        "words once and ignoring numbers.\n\n"
        "2. `longest_word(text)` returns the longest word of `text`; on a tie the first one "
        "wins, and an empty text gives an empty string.\n\n"
        "3. `shortest_word(text)` returns the shortest word of `text`, skipping words of one "
        "letter unless the text has no others.\n\n"
        "4. `unique_words(text)` returns the set of distinct words of `text` in lower case, "
        "so `The` and `the` count as one.\n\n"
        "5. `lexical_diversity(text)` returns distinct words over all words of `text`, a "
        "float between 0 and 1, or 0.0 for an empty text.\n\n"
        "6. `most_common(text, n)` returns the `n` most frequent words of `text` with their "
        "counts, as `(word, count)` pairs sorted by count.\n\n"
    )
    assert feed(documented)[0] is None


async def test_a_thread_whose_list_runs_away_is_cut_soon_and_keeps_its_first_items(
    make_server: ServerFactory,
) -> None:
    def reply(request: RecordedRequest) -> Reply:
        limit = int((request.body or {}).get("max_tokens") or ALLOWANCE)
        return Reply(content=runaway_list(limit), finish_reason="length", chunk_delay_s=0.001)

    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=review_plan())),
            Rule(role="worker", reply=reply),
        ]
    )
    settings = settings_for(server, worker_max_tokens=1024, stream_plan=False)
    result, events = await run(compile_apr_graph(settings=settings), "Review three files")

    workers = server.chat_requests("worker")
    assert len(workers) == 3  # no continuation, no retry with more room, no fresh attempt
    template_starts = len(runaway_list().split("2. **Missing")[0].split())
    for request in workers:
        assert request.streamed - template_starts <= CUT_WITHIN, request.streamed
    for thread in result["threads"]:
        assert thread["status"] == "done"
        assert "Unchecked total" in thread["answer"]
        assert "`__hash__`" not in thread["answer"]
        assert thread["looped"]["at_tokens"] > 0
    assert result["metrics"]["loops"] == 3
    assert len([e for e in events if e["event"] == "thread_looped"]) == 3
