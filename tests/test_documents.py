"""A context of named documents: each thread reads the documents its goal names."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from apr_graph import InputError, compile_apr_graph
from apr_graph.testing import Reply, Rule
from tests.conftest import CliRunner, ServerFactory, settings_for
from tests.test_graph import echo_worker, merge_synth
from tests.test_repetition import direct_plan

TASK = "Review calculator.py and dataset.py for bugs, then say how the two fit together."
DOCUMENTS = {
    "calculator.py": "def mean(xs):\n    return sum(xs) / len(xs)  # CALC-BODY\n",
    "src/dataset.py": "class Dataset:\n    rows = []  # DATA-BODY\n",
}
PLAN = {
    "strategy": "parallel",
    "merge": "synthesize",
    "subtasks": [
        {"id": "s1", "goal": "Review calculator.py for bugs"},
        {"id": "s2", "goal": "Review dataset.py for bugs"},
        {"id": "s3", "goal": "Say how the two files fit together"},
    ],
}


def _server(make_server: ServerFactory) -> Any:
    return make_server(
        [Rule(role="planner", reply=Reply(content=PLAN)), echo_worker(), merge_synth()]
    )


async def _run(app: Any, inputs: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The run's custom events and its final state."""
    events: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    async for mode, chunk in app.astream(inputs, stream_mode=["custom", "values"]):
        if mode == "custom":
            events.append(chunk)
        else:
            result = chunk
    return events, result


def _worker_text(server: Any) -> dict[str, str]:
    """Each thread's whole request as text, by the goal in its last message."""
    out = {}
    for request in server.chat_requests("worker"):
        goal = request.last_user_message.split(":", 1)[1].splitlines()[0].strip()
        out[goal] = json.dumps(request.messages)
    return out


async def test_a_thread_reads_only_the_documents_its_goal_names(
    make_server: ServerFactory,
) -> None:
    server = _server(make_server)
    app = compile_apr_graph(settings=settings_for(server))
    events, result = await _run(app, {"task": TASK, "context": DOCUMENTS})
    sent = _worker_text(server)
    assert len(sent) == 3  # early-started threads were adopted, not sent again
    calc, data, both = (
        sent["Review calculator.py for bugs"],
        sent["Review dataset.py for bugs"],
        sent["Say how the two files fit together"],
    )
    assert "CALC-BODY" in calc
    assert "DATA-BODY" not in calc
    # "dataset.py" names the document "src/dataset.py" by its last path part.
    assert "DATA-BODY" in data
    assert "CALC-BODY" not in data
    assert '<document name=\\"src/dataset.py\\">' in data
    assert "CALC-BODY" in both
    assert "DATA-BODY" in both
    assert "<\\\\/document>" not in both  # our own closing tags are not quoted as data
    # The plan and the merge read every document.
    for role in ("planner", "synthesizer"):
        text = json.dumps(server.chat_requests(role)[0].messages)
        assert "CALC-BODY" in text
        assert "DATA-BODY" in text
    started = {e["id"]: e.get("documents") for e in events if e["event"] == "thread_started"}
    assert started == {"s1": ["calculator.py"], "s2": ["src/dataset.py"], "s3": None}
    # The shared-prefix figure is still a byte comparison of the whole prompts.
    prompts = [json.dumps(r.messages).encode() for r in server.chat_requests("worker")]
    shared = len(os.path.commonprefix(prompts))  # noqa: RUF071
    fraction = round(shared / min(len(p) for p in prompts), 4)
    assert result["metrics"]["shared_prefix_fraction"] == fraction  # the requests as sent
    assert "result(Review calculator.py for bugs)" in result["answer"]


@pytest.mark.parametrize("stream_plan", [True, False])
async def test_thread_documents_all_gives_every_thread_the_whole_context(
    make_server: ServerFactory, stream_plan: bool
) -> None:
    server = _server(make_server)
    app = compile_apr_graph(settings=settings_for(server, stream_plan=stream_plan))
    await app.ainvoke({"task": TASK, "context": DOCUMENTS}, context={"thread_documents": "all"})
    sent = _worker_text(server)
    assert len(sent) == 3
    assert all("CALC-BODY" in text and "DATA-BODY" in text for text in sent.values())


async def test_a_string_context_is_given_whole(make_server: ServerFactory) -> None:
    server = _server(make_server)
    app = compile_apr_graph(settings=settings_for(server))
    await app.ainvoke({"task": TASK, "context": "calculator.py: CALC-BODY; dataset.py: DATA-BODY"})
    assert all("CALC-BODY" in t and "DATA-BODY" in t for t in _worker_text(server).values())


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"a.py": 3}, "maps each non-empty name to its text"),
        ({" ": "text"}, "maps each non-empty name to its text"),
        (["a.py"], "a string or a mapping of document names to texts, got list"),
    ],
)
async def test_a_bad_context_is_a_clear_error(
    make_server: ServerFactory, context: Any, message: str
) -> None:
    server = _server(make_server)
    app = compile_apr_graph(settings=settings_for(server))
    with pytest.raises(InputError, match=message):
        await app.ainvoke({"task": TASK, "context": context})
    assert server.chat_requests() == []


def test_apr_ask_takes_files_as_documents(
    make_server: ServerFactory, run_cli: CliRunner, tmp_path: Path
) -> None:
    server = _server(make_server)
    calc = tmp_path / "calculator.py"
    calc.write_text(DOCUMENTS["calculator.py"])
    data = tmp_path / "dataset.py"
    data.write_text(DOCUMENTS["src/dataset.py"])
    done = run_cli(
        "ask", "--base-url", server.base_url, "--model", "test-model",
        "--file", str(calc), "--file", str(data), TASK,
    )  # fmt: skip
    assert done.code == 0, done.err
    sent = _worker_text(server)
    assert "DATA-BODY" not in sent["Review calculator.py for bugs"]
    assert f'<document name=\\"{calc}\\">' in sent["Review calculator.py for bugs"]


def test_apr_ask_reads_a_folder_s_text_files(
    make_server: ServerFactory, run_cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _server(make_server)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "calculator.py").write_text(DOCUMENTS["calculator.py"])
    (src / "sub" / "dataset.py").write_text(DOCUMENTS["src/dataset.py"])
    (src / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (src / ".env").write_text("SECRET=1")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "calculator.txt").write_text("cached")
    monkeypatch.chdir(tmp_path)
    done = run_cli(
        "ask", "--base-url", server.base_url, "--model", "test-model", "--file", "src", TASK
    )
    assert done.code == 0, done.err
    assert "apr: --file src: 2 text files; skipped 1 that are not UTF-8 text" in done.err
    sent = _worker_text(server)
    review = sent["Review calculator.py for bugs"]
    assert '<document name=\\"src/calculator.py\\">' in review
    assert "DATA-BODY" in sent["Review dataset.py for bugs"]
    everything = server.chat_requests("planner")[0].all_text
    assert "SECRET" not in everything
    assert "cached" not in everything
    from apr_graph import cli_common

    monkeypatch.setattr(cli_common, "FOLDER_FILES", 1)
    many = run_cli("ask", "--file", "src", "x")
    assert many.code == 2
    assert "--file src: more than 1 text files" in many.err


def test_apr_ask_reads_what_git_would_track_of_a_folder_in_a_work_tree(
    make_server: ServerFactory, run_cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _server(make_server)
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "venv" / "lib" / "site.py").write_text("VENV-BODY")
    (tmp_path / ".gitignore").write_text("venv/\n")
    (tmp_path / "calculator.py").write_text(DOCUMENTS["calculator.py"])
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    done = run_cli(
        "ask", "--base-url", server.base_url, "--model", "test-model", "--file", ".", TASK
    )
    assert done.code == 0, done.err
    assert "apr: --file .: 2 text files" in done.err  # calculator.py and .gitignore
    everything = server.chat_requests("planner")[0].all_text
    assert "CALC-BODY" in everything
    assert "VENV-BODY" not in everything
    # A folder git ignores whole is read as a folder outside git would be.
    ignored = run_cli(
        "ask", "--base-url", server.base_url, "--model", "test-model", "--file", "venv", TASK
    )
    assert ignored.code == 0, ignored.err
    assert "apr: --file venv: 1 text files" in ignored.err


def test_apr_ask_file_errors_are_clear(run_cli: CliRunner, tmp_path: Path) -> None:
    done = run_cli("ask", "--file", str(tmp_path / "missing.py"), "x")
    assert done.code == 2
    assert "--file" in done.err
    assert "missing.py: No such file or directory" in done.err
    assert "Traceback" not in done.err
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = run_cli("ask", "--file", str(empty), "x")
    assert folder.code == 2
    assert f"{empty}: no UTF-8 text file in this folder" in folder.err
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\xd0\xff")
    assert "blob.bin: not UTF-8 text" in run_cli("ask", "--file", str(binary), "x").err
    note = tmp_path / "n.txt"
    note.write_text("n")
    done = run_cli("ask", "--file", str(note), "--context", "more", "x")
    assert done.code == 2
    assert "--context and --file do not combine" in done.err


LONG = {
    "calculator.py": "def mean(xs):\n    return sum(xs) / len(xs)\n" + "# CALC-TAIL\n" * 80,
    "dataset.py": "class Dataset:\n    rows = []\n" + "# DATA-TAIL\n" * 80,
}


def _direct_then_answer(make_server: ServerFactory, plan: dict[str, Any]) -> Any:
    """A planner that answers ``plan``; the direct call after it answers "DIRECT"."""

    def reply(request: Any) -> Reply:
        if "You are the planner" in request.messages[0]["content"]:
            return Reply(content=plan)
        return Reply(content="DIRECT")

    return make_server([Rule(role="planner", reply=reply)])


@pytest.mark.parametrize(
    "plan",
    [{"strategy": "direct"}, {"strategy": "direct", "working": "-", "answer": "from the head"}],
)
async def test_the_planner_reads_long_documents_in_part_and_never_answers_them(
    make_server: ServerFactory, plan: dict[str, Any]
) -> None:
    server = _direct_then_answer(make_server, plan)
    app = compile_apr_graph(settings=settings_for(server))
    result = await app.ainvoke({"task": "Review calculator.py and dataset.py", "context": LONG})
    planner, direct = server.chat_requests("planner")
    seen = json.dumps(planner.messages)
    assert "def mean(xs)" in seen  # each document's beginning, name and size
    assert "CALC-TAIL" in seen
    assert seen.count("CALC-TAIL") < 60
    assert f'chars=\\"{len(LONG["calculator.py"])}\\"' in seen
    assert "[...]" in seen
    # The plan's schema offers no answer of its own: a direct answer reads every document.
    direct_choice = planner.body["response_format"]["json_schema"]["schema"]["anyOf"][0]
    assert direct_choice["required"] == ["strategy"]
    assert json.dumps(direct.messages).count("CALC-TAIL") == 80
    assert result["answer"] == "DIRECT"


async def test_the_planner_reads_short_documents_whole_and_may_answer(
    make_server: ServerFactory,
) -> None:
    server = _direct_then_answer(make_server, {"strategy": "direct", "working": "-", "answer": "A"})
    app = compile_apr_graph(settings=settings_for(server))
    result = await app.ainvoke({"task": "Review calculator.py", "context": DOCUMENTS})
    assert len(server.chat_requests()) == 1
    assert "CALC-BODY" in json.dumps(server.chat_requests()[0].messages)
    assert result["answer"] == "A"
    # planner_document_chars=None reads long ones whole too, per run.
    server = _direct_then_answer(make_server, {"strategy": "direct", "working": "-", "answer": "B"})
    app = compile_apr_graph(settings=settings_for(server))
    result = await app.ainvoke(
        {"task": "Review calculator.py", "context": LONG},
        context={"planner_document_chars": None},
    )
    assert json.dumps(server.chat_requests()[0].messages).count("CALC-TAIL") == 80
    assert result["answer"] == "B"


async def test_a_forked_thread_s_nested_run_gets_its_documents_as_documents(
    make_server: ServerFactory,
) -> None:
    root = {
        "strategy": "parallel",
        "merge": "synthesize",
        "subtasks": [
            {"id": "s1", "goal": "Review calculator.py in depth", "fork": True},
            {"id": "s2", "goal": "Review dataset.py"},
        ],
    }
    nested = {
        "strategy": "parallel",
        "merge": "synthesize",
        "subtasks": [{"id": "n1", "goal": "Check mean"}, {"id": "n2", "goal": "Check the rest"}],
    }
    server = make_server(
        [
            Rule(role="planner", contains="in depth\n</task>", reply=Reply(content=nested)),
            Rule(role="planner", reply=Reply(content=root)),
            echo_worker(),
            merge_synth(),
        ]
    )
    app = compile_apr_graph(settings=settings_for(server))
    result = await app.ainvoke({"task": TASK, "context": DOCUMENTS})
    child_plan = json.dumps(server.chat_requests("planner")[1].messages)
    assert '<document name=\\"calculator.py\\">' in child_plan
    assert "DATA-BODY" not in child_plan
    sent = _worker_text(server)
    assert "CALC-BODY" in sent["Check mean"]
    assert "DATA-BODY" not in sent["Check mean"]
    assert result["metrics"]["max_depth_reached"] == 2


MAPPED_TASK = (
    "Review these files for bugs: (a) calculator.py, (b) dataset.py and (c) notes.md. "
    "Give the findings for each file, most serious first."
)
MAPPED_DOCUMENTS = {**DOCUMENTS, "notes.md": "# Notes  NOTES-BODY\n"}


def _goal_last(request: Any) -> str:
    """A ``concat`` thread's goal: the last line of its message."""
    return str(request.last_user_message.splitlines()[-1].strip())


def _concat_worker() -> Rule:
    return Rule(role="worker", reply=lambda r: Reply(content=f"result({_goal_last(r)})"))


async def test_a_task_that_maps_over_its_documents_is_planned_without_a_model_call(
    make_server: ServerFactory,
) -> None:
    server = make_server([_concat_worker()])  # no planner: a planning request fails the run
    app = compile_apr_graph(settings=settings_for(server))
    events, result = await _run(app, {"task": MAPPED_TASK, "context": MAPPED_DOCUMENTS})
    assert server.chat_requests("planner") == []
    plan = result["plan"]
    assert plan["strategy"] == "parallel"
    assert plan["merge"] == "concat"
    assert [s["goal"] for s in plan["subtasks"]] == [
        "(a) calculator.py",
        "(b) dataset.py",
        "(c) notes.md",
    ]
    assert "planned without a model call" in plan["notes"][0]
    sent = {_goal_last(r): json.dumps(r.messages) for r in server.chat_requests("worker")}
    assert len(sent) == 3
    assert "CALC-BODY" in sent["(a) calculator.py"]
    assert "DATA-BODY" not in sent["(a) calculator.py"]
    assert "DATA-BODY" in sent["(b) dataset.py"]
    assert "NOTES-BODY" in sent["(c) notes.md"]
    assert "CALC-BODY" not in sent["(c) notes.md"]
    started = {e["id"]: e.get("documents") for e in events if e["event"] == "thread_started"}
    assert started == {"s1": ["calculator.py"], "s2": ["src/dataset.py"], "s3": ["notes.md"]}
    for goal in ("(a) calculator.py", "(b) dataset.py", "(c) notes.md"):
        assert f"result({goal})" in result["answer"]


async def test_a_task_that_asks_the_same_of_each_document_is_planned_without_a_model_call(
    make_server: ServerFactory,
) -> None:
    server = make_server([_concat_worker()])  # no planner: a planning request fails the run
    app = compile_apr_graph(settings=settings_for(server))
    task = "For each file, list what it defines."
    _, result = await _run(app, {"task": task, "context": MAPPED_DOCUMENTS})
    assert server.chat_requests("planner") == []
    assert [s["goal"] for s in result["plan"]["subtasks"]] == list(MAPPED_DOCUMENTS)
    sent = {_goal_last(r): json.dumps(r.messages) for r in server.chat_requests("worker")}
    assert "CALC-BODY" in sent["calculator.py"]
    assert "DATA-BODY" in sent["src/dataset.py"]
    assert "CALC-BODY" not in sent["src/dataset.py"]
    assert "NOTES-BODY" not in sent["src/dataset.py"]
    for name in MAPPED_DOCUMENTS:
        assert f"result({name})" in result["answer"]


@pytest.mark.parametrize(
    ("task", "documents", "context"),
    [
        # asks for something across the files
        ("Compare (a) calculator.py (b) dataset.py (c) notes.md", MAPPED_DOCUMENTS, None),
        # a part names two documents
        ("Review (a) calculator.py and dataset.py (b) notes.md", MAPPED_DOCUMENTS, None),
        # a document no part names
        ("Review (a) calculator.py (b) dataset.py", MAPPED_DOCUMENTS, None),
        # a part that is a sentence, not a name
        ("Review (a) calculator.py (b) dataset.py. Is it safe? (c) notes.md", MAPPED_DOCUMENTS, {}),
        # the same of each file, then something across them
        ("For each file, say how it relates to the others.", MAPPED_DOCUMENTS, None),
        # each of its documents, but one string of context
        ("For each file, list what it defines.", "calculator.py: ...", None),
        # turned off for this run
        (MAPPED_TASK, MAPPED_DOCUMENTS, {"plan_documents": False}),
        ("For each file, list what it defines.", MAPPED_DOCUMENTS, {"plan_documents": False}),
        # threads read every document
        (MAPPED_TASK, MAPPED_DOCUMENTS, {"thread_documents": "all"}),
        # every thread would attempt the same question
        (MAPPED_TASK, MAPPED_DOCUMENTS, {"merge": "vote"}),
        # fewer thread slots than documents: the planner groups them
        (MAPPED_TASK, MAPPED_DOCUMENTS, {"max_total_threads": 2}),
    ],
)
async def test_other_tasks_with_documents_are_planned_by_the_model(
    make_server: ServerFactory,
    task: str,
    documents: dict[str, str],
    context: dict[str, Any] | None,
) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content={"strategy": "direct", "answer": "planned"}))]
    )
    app = compile_apr_graph(settings=settings_for(server, planner_document_chars=None))
    result = await app.ainvoke({"task": task, "context": documents}, context=context)
    assert len(server.chat_requests("planner")) == 1
    assert result["answer"] == "planned"


def answering(make_server: ServerFactory, said: str) -> Any:
    """A server whose planner answers directly, and whose direct answer is ``said``."""
    return make_server([direct_plan(), Rule(role="planner", reply=Reply(content=said))])


async def test_the_tags_a_model_copies_with_the_documents_are_not_in_the_answer(
    make_server: ServerFactory,
) -> None:
    # What a 1.5B model wrote for "Find the bugs in these files and say how to fix each": its
    # "corrected code" was the prompt's context, tags and all.
    copied = "".join(
        f'<document name="{name}">\n{text}</document>\n' for name, text in DOCUMENTS.items()
    )
    said = f"Fix: guard len(xs).\n\n```python\n<context>\n{copied}</context>\n```\n"
    app = compile_apr_graph(settings=settings_for(answering(make_server, said), router=False))
    result = await app.ainvoke({"task": "Fix the bugs", "context": DOCUMENTS})
    answer = result["answer"]
    assert "<context>" not in answer
    assert "<document" not in answer
    assert "</document>" not in answer
    assert answer.startswith("Fix: guard len(xs).\n\n```python\n")
    for text in DOCUMENTS.values():
        assert text in answer  # the code itself is kept


async def test_tags_that_are_not_the_prompt_s_stay_in_the_answer(
    make_server: ServerFactory,
) -> None:
    said = '<document name="invoice.xml">\n<total>3</total>\n</document>\n'
    app = compile_apr_graph(settings=settings_for(answering(make_server, said), router=False))
    result = await app.ainvoke({"task": "Write an XML invoice", "context": DOCUMENTS})
    assert result["answer"].strip() == said.strip()


def test_apr_ask_reads_a_file_from_stdin(make_server: ServerFactory, run_cli: CliRunner) -> None:
    server = _server(make_server)
    url = ("--base-url", server.base_url, "--model", "test-model")
    log = "ERROR disk full at 03:12\nINFO retry ok\n"
    done = run_cli("ask", "-q", *url, "--file", "-", "What failed?", stdin=log)
    assert done.code == 0, done.err
    (plan,) = server.chat_requests("planner")
    assert '<document name="stdin"' in plan.all_text
    assert "ERROR disk full at 03:12" in plan.all_text
    both = run_cli("ask", *url, "--file", "-", "-", stdin="x")
    assert both.code == 2
    assert "cannot both come from stdin" in both.err
