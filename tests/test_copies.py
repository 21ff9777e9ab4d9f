"""A thread that writes its input out again is stopped where the copy begins.

The scripted workers review one file each: they write their findings, then "Here is the
revised file" and the whole file again, unchanged (what a 1.5B model did on a real review:
~550 tokens of copy on the run's critical path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from apr_graph import AprSettings, compile_apr_graph
from apr_graph.loops import QUOTE_FACTOR, LoopDetector, asks_for_input_text
from apr_graph.responses import StreamProgress
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer
from tests.conftest import CliRunner, ServerFactory, settings_for
from tests.test_chat_model import OpenAILikeModel
from tests.test_repetition import run

NAMES = ["alpha.py", "beta.py", "gamma.py"]
TASK = (
    "Review these files for bugs and unclear names: (a) alpha.py (b) beta.py (c) gamma.py. "
    "Give the findings for each file, most serious first."
)
COPY_LINES = 12
ALLOWANCE = 600
"""Each thread's room: its findings are more than an eighth of it (a real answer, which a
fresh attempt would only delay)."""


def source(name: str, functions: int = 30) -> str:
    """A file of ``functions`` small functions (three lines and a blank each)."""
    stem = name.removesuffix(".py")
    return "".join(
        f"def {stem}_{i}(value):\n    total = value * {i} + {i * 7}\n    return total\n\n"
        for i in range(functions)
    )


DOCUMENTS = {name: source(name) for name in NAMES}


def findings(name: str) -> str:
    return (
        f"Findings for {name}, most serious first. One: the functions never check their "
        "input, so a string passed in is repeated instead of multiplied, silently. Two: "
        "every name says nothing about what it computes, so a reader must work out each "
        "body. Three: the constants are written inline with no word about where they come "
        "from.\n\n"
    )


def copying(request: RecordedRequest) -> Reply:
    """Findings, then the reviewed file written out again, unchanged."""
    name = next(n for n in NAMES if n in request.last_user_message)
    text = f"{findings(name)}Here is the revised file:\n```python\n{DOCUMENTS[name]}```\n"
    return Reply(content=text, chunk_delay_s=0.002)


def words_of_lines(text: str, lines: int) -> int:
    """Words in the first ``lines`` non-blank lines of ``text``."""
    kept = [line for line in text.splitlines() if line.strip()][:lines]
    return len(" ".join(kept).split())


async def copying_run(
    make_server: ServerFactory, task: str = TASK
) -> tuple[ScriptedServer, Any, dict[str, Any], list[dict[str, Any]]]:
    """A run of ``task`` whose workers write their file out again: the server, the graph, the
    last state and the events."""
    server = make_server([Rule(role="worker", reply=copying)])
    app = compile_apr_graph(settings=settings_for(server, worker_max_tokens=ALLOWANCE))
    result, events = await run(app, task, context=DOCUMENTS)
    return server, app, result, events


async def test_a_thread_writing_its_file_out_again_is_cut_where_the_copy_begins(
    make_server: ServerFactory,
) -> None:
    server, _, result, events = await copying_run(make_server)
    workers = server.chat_requests("worker")
    assert len(workers) == 3  # none retried: what came before the copy is the answer
    for request in workers:
        name = next(n for n in NAMES if n in request.last_user_message)
        before = len(f"{findings(name)}Here is the revised file:\n```python\n".split())
        copied = request.streamed - before
        # found at its twelfth line; the stream closed before much more than that
        assert copied <= words_of_lines(DOCUMENTS[name], COPY_LINES) + 40, copied
        assert request.streamed < len(copying(request).content.split()) / 2
    for thread in result["threads"]:
        name = next(n for n in NAMES if n in thread["goal"])
        assert thread["status"] == "done"
        assert thread["answer"] == f"{findings(name)}Here is the revised file:".strip()
        assert thread["looped"]["copied_lines"] >= COPY_LINES
        assert findings(name).strip() in result["answer"]
    assert "def alpha_0" not in result["answer"]
    assert result["metrics"]["loops"] == 3
    assert result["metrics"]["loop_saved_tokens"] > 0
    looped = [e for e in events if e["event"] == "thread_looped"]
    assert sorted(e["id"] for e in looped) == ["s1", "s2", "s3"]
    assert all(e["copied_lines"] >= COPY_LINES for e in looped)


async def test_stop_copy_lines_zero_lets_a_thread_write_its_file_out(
    make_server: ServerFactory,
) -> None:
    _, app, result, _ = await copying_run(make_server)
    assert result["metrics"]["loops"] == 3
    # per run, through the graph's context
    again = await app.ainvoke({"task": TASK, "context": DOCUMENTS}, context={"stop_copy_lines": 0})
    assert again["metrics"].get("loops", 0) == 0
    for thread in again["threads"]:
        name = next(n for n in NAMES if n in thread["goal"])
        assert DOCUMENTS[name].strip() in thread["answer"]
        assert "looped" not in thread


async def test_a_thread_that_copies_before_saying_anything_gets_one_fresh_attempt(
    make_server: ServerFactory,
) -> None:
    fresh = "alpha.py: no bugs; the names could say what they compute."

    def alpha(request: RecordedRequest) -> Reply:
        return Reply(content=f"```python\n{DOCUMENTS['alpha.py']}```\n", chunk_delay_s=0.002)

    server = make_server(
        [
            Rule(role="worker", contains="Do not copy it", reply=Reply(content=fresh)),
            Rule(role="worker", contains="alpha.py", reply=alpha),
            Rule(role="worker", reply=lambda r: Reply(content="fine")),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server, worker_max_tokens=2000))
    result, _ = await run(app, TASK, context=DOCUMENTS)
    mine = [r for r in server.chat_requests("worker") if "alpha.py" in r.last_user_message]
    assert len(mine) == 2
    assert [r.body["max_tokens"] for r in mine if r.body] == [2000, 2000]  # no more room
    thread = next(t for t in result["threads"] if "alpha.py" in t["goal"])
    assert thread["answer"] == fresh
    assert thread["looped"]["attempts"] == 1


def _feed(detector: LoopDetector, text: str, size: int = 7) -> Any:
    for start in range(0, len(text), size):
        if (loop := detector.feed(text[start : start + size])) is not None:
            return loop
    return None


def test_a_copy_is_found_at_its_twelfth_line_whatever_the_indentation_and_blank_lines() -> None:
    doc = source("alpha.py")
    reply = "Two bugs.\n\n```python\n" + doc.replace("    ", "  ").replace("\n\n", "\n\n\n")
    loop = _feed(LoopDetector(doc, COPY_LINES), reply)
    assert loop is not None
    assert loop.copied_lines == COPY_LINES
    assert reply[: loop.keep] == "Two bugs.\n\n```python\n"
    progress = StreamProgress(copy_source=doc, copy_lines=COPY_LINES)
    for piece in reply:
        progress.add(piece)
        if progress.loop is not None:
            break
    progress.cut_at_loop()
    assert progress.text == "Two bugs."  # the opening fence left with nothing in it is dropped


def test_changed_lines_break_a_copy_and_what_was_changed_is_kept() -> None:
    doc = source("alpha.py")
    lines = doc.splitlines(keepends=True)
    # a corrected file: one line in every eight changed (the copy never reaches twelve)
    corrected = "".join(
        line.replace("value *", "int(value) *") if i % 8 == 1 else line
        for i, line in enumerate(lines)
    )
    assert _feed(LoopDetector(doc, COPY_LINES), corrected) is None
    # one change, then the rest unchanged: cut after the change, the change kept
    changed = "".join(lines[:2]) + "    total = int(value) * 0 + 0\n" + "".join(lines[3:])
    loop = _feed(LoopDetector(doc, COPY_LINES), "```python\n" + changed)
    assert loop is not None
    progress = StreamProgress(copy_source=doc, copy_lines=COPY_LINES)
    for piece in "```python\n" + changed:
        progress.add(piece)
        if progress.loop is not None:
            break
    progress.cut_at_loop()
    assert "int(value) * 0" in progress.text
    assert progress.text.endswith("```")  # the open block closed


def test_an_added_line_that_occurs_later_in_the_file_does_not_hide_the_rewrite() -> None:
    # A corrected file: a check added at the top of a function, worded as a check further
    # down the file is. Taken as the rewrite having reached that line, the unchanged lines
    # after it read as going back, a quote: 40 lines went by uncut (a real 1.5B reply).
    doc = (
        "class Store:\n    def __init__(self):\n        self.items = {}\n\n"
        "    def add(self, name, count):\n        self.items[name] = count\n\n"
        + "".join(
            f"    def get_{i}(self, name):\n        return self.items[name] + {i}\n\n"
            for i in range(20)
        )
        + "    def restock(self, name, count):\n        if count < 0:\n"
        '            raise ValueError("count must be positive")\n'
        "        self.items[name] += count\n"
    )
    lines = doc.splitlines(keepends=True)
    added = '        if count < 0:\n            raise ValueError("count must be positive")\n'
    rewrite = "".join(lines[:5]) + added + "".join(lines[5:])
    loop = _feed(LoopDetector(doc, COPY_LINES), "Fixed:\n\n```python\n" + rewrite)
    assert loop is not None
    assert loop.copied_lines == COPY_LINES
    kept = ("Fixed:\n\n```python\n" + rewrite)[: loop.keep]
    assert kept.endswith(added)  # the change is kept; the unchanged rest is not


def test_quotes_short_copies_and_reordered_lines_are_not_copies() -> None:
    doc = source("alpha.py")
    lines = [line for line in doc.splitlines() if line.strip()]
    quoted = "The first functions:\n" + "\n".join(lines[: COPY_LINES - 1]) + "\nare fine.\n"
    assert _feed(LoopDetector(doc, COPY_LINES), quoted) is None
    shuffled = "\n".join(lines[::2][: COPY_LINES * 2]) + "\n"  # every line from the file
    assert _feed(LoopDetector(doc, COPY_LINES), shuffled) is None
    assert _feed(LoopDetector("", COPY_LINES), doc) is None  # nothing to copy from
    assert _feed(LoopDetector(doc, 0), doc) is None  # not watched


async def test_a_task_that_asks_for_its_files_changed_keeps_its_copies(
    make_server: ServerFactory,
) -> None:
    task = "Fix the bugs in (a) alpha.py (b) beta.py (c) gamma.py."
    server, _, result, _ = await copying_run(make_server, task)
    assert len(server.chat_requests("worker")) == 3
    assert result["metrics"].get("loops", 0) == 0
    for thread in result["threads"]:
        name = next(n for n in NAMES if n in thread["goal"])
        assert DOCUMENTS[name].strip() in thread["answer"]  # the corrected file is the answer


def test_which_tasks_ask_for_documents_changed() -> None:
    for task in (
        "Fix the bugs in a.py",
        "Add type hints to every function",
        "Rewrite the intro of notes.md",
        "Refactor (a) x.py (b) y.py",
        "Translate README.md into French",
        "Rename the unclear variables",
        "Extract the function that parses dates",
        "Quote the paragraph about refunds",
        "Show me the rows of data.csv where the price is over 10",
    ):
        assert asks_for_input_text(task), task
    for task in (
        "Review these files for bugs, risky code and unclear names",
        "Explain what each file does and how to call it",
        "Summarize the report in three sentences",
        "Which address does the parser accept, and what does it report?",
    ):
        assert not asks_for_input_text(task), task
    assert asks_for_input_text("Review x.py", "Fix x.py")  # a thread's goal may ask for it


async def test_a_thread_started_while_the_plan_streams_is_watched_for_copies_too(
    make_server: ServerFactory,
) -> None:
    goals = ["Review alpha.py", "Review beta.py", "Review gamma.py"]
    plan = {"strategy": "parallel", "merge": "concat", "subtasks": goals}
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=plan, chunk_delay_s=0.03)),
            Rule(role="worker", reply=copying),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server, worker_max_tokens=ALLOWANCE))
    result, _ = await run(app, "Look these files over for bugs.", context=DOCUMENTS)
    planner_end = server.chat_requests("planner")[0].ended_at
    workers = server.chat_requests("worker")
    assert planner_end is not None
    assert min(w.started_at for w in workers) < planner_end  # sent while the plan streamed
    assert len(workers) == 3  # the early requests were adopted, none sent again
    for thread in result["threads"]:
        assert thread["looped"]["copied_lines"] >= COPY_LINES
        assert thread["answer"].endswith("Here is the revised file:")


def test_a_quote_from_the_middle_of_a_file_is_cut_only_when_it_runs_three_times_as_long() -> None:
    doc = source("alpha.py")
    lines = [line for line in doc.splitlines() if line.strip()]
    prompt = f'<context>\n<document name="alpha.py">\n{doc}</document>\n</context>'
    quote = "\n".join(lines[30 : 30 + COPY_LINES + 6])  # a few functions, shown whole
    explained = f"These functions scale their input:\n```python\n{quote}\n```\nEach one is fine.\n"
    assert _feed(LoopDetector(prompt, COPY_LINES), explained) is None
    long_copy = "The rest of it:\n" + "\n".join(lines[30:]) + "\n"
    loop = _feed(LoopDetector(prompt, COPY_LINES), long_copy)
    assert loop is not None
    assert loop.copied_lines == COPY_LINES * QUOTE_FACTOR
    assert long_copy[: loop.keep] == "The rest of it:\n"
    # written out again from its top (its first line skipped), with a change: a rewrite
    rewrite = "```python\n" + "\n".join([*lines[1:4], "    return 0", *lines[5:]]) + "\n"
    loop = _feed(LoopDetector(prompt, COPY_LINES), rewrite)
    assert loop is not None
    assert loop.copied_lines == COPY_LINES
    assert "return 0" in rewrite[: loop.keep]  # the change is kept


def test_apr_ask_says_which_thread_copied_its_input(
    make_server: ServerFactory,
    run_cli: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = make_server([Rule(role="worker", reply=copying)])
    files = []
    for name in NAMES:
        (tmp_path / name).write_text(DOCUMENTS[name])
        files += ["--file", str(tmp_path / name)]
    monkeypatch.setenv("APR_WORKER_MAX_TOKENS", str(ALLOWANCE))
    done = run_cli("ask", "--base-url", server.base_url, "--model", "m", *files, TASK)
    assert done.code == 0, done.err
    for sid in ("s1", "s2", "s3"):
        assert f"apr: thread {sid} began writing out {COPY_LINES} lines of its input again" in (
            done.err
        )
    assert "3 repeating or copying replies stopped" in done.err
    assert "def alpha_0" not in done.out
    assert findings("alpha.py").strip() in done.out


class CopyingChatModel(OpenAILikeModel):
    """A LangChain chat model whose threads review their file, then write it out again."""

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        asked = str(messages[-1].content)
        name = next((n for n in NAMES if n in asked), None)
        if name is None or not asked.startswith("Subtask"):
            return super()._generate(messages, stop, run_manager, **kwargs)
        text = f"{findings(name)}Here is the revised file:\n```python\n{DOCUMENTS[name]}```\n"
        message = AIMessage(content=text, response_metadata={"finish_reason": "stop"})
        return ChatResult(generations=[ChatGeneration(message=message)])


async def test_a_chat_model_thread_that_copies_its_file_is_cut_the_same_way() -> None:
    plan = {
        "strategy": "parallel",
        "merge": "concat",
        "subtasks": ["Review alpha.py", "Review beta.py"],
    }
    model = CopyingChatModel(plan=plan)
    app = compile_apr_graph(model=model, settings=AprSettings(worker_max_tokens=ALLOWANCE))
    result = await app.ainvoke({"task": "Look these files over.", "context": DOCUMENTS})
    for thread in result["threads"]:
        name = next(n for n in NAMES if n in thread["goal"])
        assert thread["answer"] == f"{findings(name)}Here is the revised file:".strip()
        assert thread["looped"]["copied_lines"] >= COPY_LINES
    assert result["metrics"]["loops"] == 2
