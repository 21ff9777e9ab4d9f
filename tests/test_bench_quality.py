"""The benchmark's quality bar: accuracy with its interval beside every speedup, no speedup
presented as a win at clearly lower accuracy, and the multipart suite's checker."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from apr_graph.bench.main import main
from apr_graph.bench.multipart import part_results
from apr_graph.bench.quality import wilson
from apr_graph.bench.report import markdown
from apr_graph.bench.runner import summarise
from apr_graph.bench.strategies import Outcome
from apr_graph.bench.suites import make_suite
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer


def _sequential_answer(request: RecordedRequest) -> Reply:
    """A slow, right chain of thought: computes the task's parts from its prompt."""
    parts = re.findall(r"\(\w\) (\d+ [-+*] \d+)", request.last_user_message)
    answer = " ".join(str(eval(p)) for p in parts)
    return Reply(content=f"thinking thinking Final answer: {answer}", chunk_delay_s=0.03)


def test_a_fast_wrong_strategy_never_shows_a_speedup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The "224x speedup at 0% accuracy" case: the planner answers at once, and wrongly.
    rules = [
        Rule(
            role="planner",
            where=lambda r: r.system_message.startswith("You are the planner"),
            reply=Reply(content={"strategy": "direct", "answer": "no idea"}),
        ),
        Rule(role="planner", reply=_sequential_answer),  # the sequential baseline's call
    ]
    out = tmp_path / "bench"
    with ScriptedServer(rules) as server:
        code = main(
            [
                *("--backend", "url", "--base-url", server.base_url, "--suites", "arithmetic"),
                *("--strategies", "sequential,adaptive", "--tasks", "2", "--no-plots"),
                *("--out", str(out)),
            ]
        )
    assert code == 0
    rows = {r["strategy"]: r for r in json.loads((out / "results.json").read_text())["suites"]}
    assert rows["sequential"]["correct"] == 2
    assert rows["adaptive"]["correct"] == 0
    assert rows["adaptive"]["wall_median_s"] < rows["sequential"]["wall_median_s"] / 3
    assert rows["adaptive"]["speedup"] is None  # much faster, and not a win
    assert rows["adaptive"]["speedup_note"] == "accuracy 0/2"
    printed = capsys.readouterr().out
    adaptive = next(line for line in printed.splitlines() if " adaptive " in line)
    assert "0/2 (0.00, 95% CI 0.00-0.66)" in adaptive
    assert "n/a (accuracy 0/2)" in adaptive
    assert not re.search(r"\d\.\d\dx", adaptive)  # no speedup figure on that line
    table = (out / "results.md").read_text()
    assert "| arithmetic | adaptive | 0/2 (0.00, 95% CI 0.00-0.66) | n/a (accuracy 0/2) |" in table
    assert "| arithmetic | sequential | 2/2 (1.00, 95% CI 0.34-1.00) | 1.00x |" in table


def _outcome(strategy: str, index: int, correct: bool, wall_s: float) -> Outcome:
    crashed = strategy == "crashing"
    return Outcome(
        strategy,
        "multipart",
        f"t{index}",
        correct,
        wall_s,
        1,
        10,
        10,
        10,
        "",
        error="ModelCallError: boom" if crashed else None,
        parts_correct=3 if correct else 0 if crashed else 1,
        parts_total=3,
    )


def test_speedup_is_shown_only_at_comparable_accuracy() -> None:
    right = {"sequential": 8, "close": 7, "worse": 3, "crashing": 0}
    outcomes = [
        _outcome(strategy, i, i < count, 8.0 if strategy == "sequential" else 1.0)
        for strategy, count in right.items()
        for i in range(8)
    ]
    rows = {r["strategy"]: r for r in summarise(outcomes)}
    assert [rows[s]["correct"] for s in right] == [8, 7, 3, 0]
    assert rows["close"]["speedup"] == 8.0  # one miss in 8 is within the noise
    assert rows["worse"]["speedup"] is None
    assert rows["crashing"]["errors"] == 8
    assert (rows["close"]["parts_correct"], rows["close"]["parts_total"]) == (22, 24)
    results = {
        "backend": "sim",
        "command": "apr bench",
        "machine": {"platform": "p", "cpus": 2, "python": "3.11", "date": "today"},
        "suites": list(rows.values()),
        "scaling": [
            {
                "threads": 4,
                "tasks": 1,
                "sequential_correct": 1,
                "adaptive_correct": 0,
                "achieved_speedup": None,
                "ideal_speedup": None,
                "fraction_of_ideal": None,
                "speedup_note": "accuracy 0/1",
                "sequential_wall_s": 1.0,
                "adaptive_wall_s": 0.1,
            }
        ],
    }
    table = markdown(results)
    expected = [
        "| multipart | sequential | 8/8 (1.00, 95% CI 0.68-1.00) | 1.00x | 24/24 | 0 |",
        "| multipart | close | 7/8 (0.88, 95% CI 0.53-0.98) | 8.00x | 22/24 | 0 |",
        "| multipart | worse | 3/8 (0.38, 95% CI 0.14-0.69) "
        "| n/a (accuracy 3/8, below the baseline's 8/8) | 14/24 | 0 |",
        "| multipart | crashing | 0/8 (0.00, 95% CI 0.00-0.32) | n/a (accuracy 0/8) | 0/24 | 8 |",
        "| 4 | 1/1 (1.00, 95% CI 0.21-1.00) | 0/1 (0.00, 95% CI 0.00-0.79) "
        "| n/a (accuracy 0/1) | n/a | n/a |",
    ]
    for line in expected:
        assert line in table
    assert not re.search(r"\| (?:3|0)/8 [^|]*\| \d", table)


def test_wilson_interval() -> None:
    assert wilson(7, 8) == pytest.approx((0.529, 0.978), abs=0.001)
    assert wilson(0, 8) == pytest.approx((0.0, 0.324), abs=0.001)
    assert wilson(8, 8) == pytest.approx((0.676, 1.0), abs=0.001)
    assert wilson(0, 0) == (0.0, 1.0)


def test_multipart_is_seeded_and_mixes_facts_and_calculations() -> None:
    tasks = make_suite("multipart", 100, seed=1, parts=3)
    assert [t.prompt for t in tasks] == [
        t.prompt for t in make_suite("multipart", 100, seed=1, parts=3)
    ]
    assert tasks[0].prompt != make_suite("multipart", 1, seed=2, parts=3)[0].prompt
    for task in tasks:
        assert task.prompt.startswith("Answer each part: (a) ")
        assert len(task.parts) == len(task.expected) == 3
        calculations = [p for p in task.parts if re.fullmatch(r"What is \d+ [-+*] \d+\?", p)]
        assert len(calculations) == 1
        assert len({e.casefold() for e in task.expected}) == 3  # each part checkable alone
        # an answer that only echoes the questions gets no part
        assert task.part_score(task.prompt) == (0, 3)
        for part, value in zip(task.parts, task.expected, strict=True):
            if part in calculations:
                assert value == str(eval(part[8:-1]))


def test_multipart_checker_needs_every_part() -> None:
    task = make_suite("multipart", 1, seed=5, parts=4)[0]
    labelled = " ".join(f"({x}) {v}" for x, v in zip("abcd", task.expected, strict=True))
    assert task.check(labelled)
    assert task.part_score(labelled) == (4, 4)
    for missing in range(4):
        kept = [v for i, v in enumerate(task.expected) if i != missing]
        assert not task.check(" ".join(kept))
        assert task.part_score(" ".join(kept)) == (3, 4)
        wrong = labelled.replace(f"({'abcd'[missing]}) {task.expected[missing]}", "(x) 12345")
        assert not task.check(wrong)
    assert not task.check(" ".join(reversed(task.expected)))  # unlabelled: in order
    assert task.part_score("") == (0, 4)


def test_multipart_checker_accepts_formatting_variants() -> None:
    answers = [("391",), ("Nairobi",), ("6",), ("9801",), ("carbon dioxide", "CO2")]
    accepted = [
        "(a) 391 (b) Nairobi (c) 6 (d) 9801 (e) carbon dioxide",
        "(A) 391.0; (B) NAIROBI. (C) six; (D) 9,801; (E) CO\u2082",
        "a) 17 * 23 = 391\nb) The capital of Kenya is Nairobi.\nc) A hexagon has six sides.\n"
        "d) 9801.00\ne) Carbon Dioxide!",
        "1. 391\n2. nairobi\n3. 6\n4. 9 801\n5. co2".replace("9 801", "9\u202f801"),
        "**Part a:** 391 **Part b:** Nairobi **Part c:** 6 **Part d:** 9801 **Part e:** CO2",
        "Final answer: 391, Nairobi, 6, 9801, carbon dioxide.",
    ]
    for answer in accepted:
        assert all(part_results(answer, answers)), answer
    rejected = {
        "(a) 391 (b) Nairobi (c) 6 (d) 9802 (e) carbon dioxide": 3,
        "(a) 391 (b) Nairobi (c) 6 (e) carbon dioxide": 3,  # (d) missing
        "(a) 391 (b) 6 (c) Nairobi (d) 9801 (e) CO2": 1,  # parts swapped
        "(a) 3910 (b) Nairobis (c) 16 (d) 98010 (e) carbon": 0,
    }
    for answer, index in rejected.items():
        assert not part_results(answer, answers)[index], answer
    assert part_results("(a) Brasilia (b) 24", [("Brasília",), ("24",)]) == [True, True]
    # A chain of thought that labels its steps: its last listing is the final answer.
    steps = "(a) 17 * 23 = 401? (b) Kenya: Nairobi (c) six sides. Final answer: "
    assert all(part_results(steps + "(a) 391 (b) Nairobi (c) 6", answers[:3]))
    wrong_at_last = steps.replace("401", "391") + "(a) 401 (b) Nairobi (c) 6"
    assert part_results(wrong_at_last, answers[:3]) == [False, True, True]
    assert part_results("(a) -34 (b) 34", [("34",), ("-34",)]) == [False, False]
