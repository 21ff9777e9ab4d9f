"""The task-shape router: the shipped weights on held-out data, and the trainer's own functions."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from apr_graph.router import Shape, task_shape

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "decision"


def _held_out(name: str) -> list[dict[str, object]]:
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _balanced_accuracy(labels: list[int], predicted: list[int]) -> float:
    ones = [p for y, p in zip(labels, predicted, strict=True) if y == 1]
    zeros = [p for y, p in zip(labels, predicted, strict=True) if y == 0]
    return (sum(ones) / len(ones) + zeros.count(0) / len(zeros)) / 2


@pytest.fixture(scope="module")
def trainer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_router", ROOT / "scripts/train_router.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_router_loads_and_explains() -> None:
    shape = task_shape("(a) What causes tides? (b) Why is the sky blue?")
    assert isinstance(shape, Shape)
    assert 0.0 <= shape.parallel <= 1.0
    assert 0.0 < shape.threshold < 1.0
    assert shape.parts == 2
    assert len(shape.why) == 3
    assert all(isinstance(reason, str) and reason for reason in shape.why)
    assert shape.splits == (shape.parallel >= shape.threshold)


def test_held_out_sot_vicuna_meets_the_issue_target() -> None:
    rows = _held_out("heldout_sot_vicuna.jsonl")
    assert len(rows) == 80
    labels = [int(str(r["label"])) for r in rows]
    predicted = [int(task_shape(str(r["prompt"])).splits) for r in rows]
    assert _balanced_accuracy(labels, predicted) >= 0.75


def test_held_out_gsm8k_singles_direct_and_triples_split() -> None:
    rows = _held_out("heldout_gsm8k_test.jsonl")
    singles = [str(r["prompt"]) for r in rows if r["label"] == 0]
    triples = [str(r["prompt"]) for r in rows if r["label"] == 1]
    assert (len(singles), len(triples)) == (8, 4)
    assert sum(not task_shape(p).splits for p in singles) >= 7
    assert all(task_shape(p).splits for p in triples)
    assert all(task_shape(p).parts == 3 for p in triples)


@pytest.mark.parametrize(
    ("task", "splits"),
    [
        ("Write a short story about a lighthouse keeper", False),
        ("What is the capital of France?", False),
        ("Explain how a refrigerator works.", False),
        ("Pretend you are a pirate captain and give a speech to your crew.", False),
        ("What are the pros and cons of remote work?", True),
        (
            "Answer each part: (a) What causes tides? (b) Why is the sky blue? "
            "(c) How do vaccines work?",
            True,
        ),
        ("Question 1: How do bees make honey?\nQuestion 2: Why do cats purr?", True),
        # Everyday list requests: LIMA's labels gave them no signal ("list" there is mostly a
        # programming list: "List ten tips for learning a new language" came out direct at
        # p 0.12); data/decision/own_dev.jsonl teaches them. These are not in it.
        ("What are some ways to save money on groceries?", True),
        ("Give a few tips for sleeping better, with a sentence on each.", True),
    ],
)
def test_hand_written_prompts(task: str, splits: bool) -> None:
    assert task_shape(task).splits is splits


def test_context_is_ignored() -> None:
    task = "Write a short story about a lighthouse keeper"
    assert task_shape(task, context="(1) a (2) b (3) c? list tips") == task_shape(task)


def test_trainer_learns_a_separable_toy_set(trainer: ModuleType) -> None:
    rng = random.Random(0)
    rows, labels = [], []
    for _ in range(60):
        label = rng.randint(0, 1)
        # feature 0 decides the label; features 1 and 2 are noise
        rows.append(([0, 1, 2], [1.0 if label else -1.0, rng.random(), rng.random()]))
        labels.append(label)
    weights, bias = trainer.fit_logistic(rows, labels, 3, l2=1e-3)
    probs = trainer.predict(rows, weights, bias)
    assert trainer.balanced_accuracy(labels, [int(p >= 0.5) for p in probs]) == 1.0
    assert weights[0] > 1.0
    assert abs(weights[0]) > 5 * max(abs(weights[1]), abs(weights[2]))
    threshold, accuracy = trainer.best_threshold(probs, labels)
    assert accuracy == 1.0
    assert 0.0 < threshold < 1.0
    fold = trainer.folds(labels, 5, 1)
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]


def test_the_verdict_does_not_depend_on_the_hash_seed() -> None:
    # Features are a set of n-grams: summed in the set's order, the last bits of the
    # probability changed with PYTHONHASHSEED, for a quarter of the development tasks.
    tasks = [
        json.loads(line)["prompt"]
        for line in (DATA / "own_dev.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    ]
    script = (
        "import json, sys\n"
        "from apr_graph.router import task_shape\n"
        "print(json.dumps([task_shape(t).parallel.hex() for t in json.load(sys.stdin)]))\n"
    )
    verdicts = [
        subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(tasks),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    ]
    assert verdicts[0] == verdicts[1] == verdicts[2]


@pytest.mark.parametrize(
    ("numbered", "lettered"),
    [
        (
            "Write three short pieces: (1) a haiku about rain, (2) a one-sentence definition of "
            "gravity, (3) a limerick about a cat.",
            "Write three short pieces: (a) a haiku about rain, (b) a one-sentence definition of "
            "gravity, (c) a limerick about a cat.",
        ),
        (
            "Answer these: 1. Who painted the Mona Lisa? 2. What do bees make?",
            "Answer these: a) Who painted the Mona Lisa? b) What do bees make?",
        ),
    ],
)
def test_part_labels_are_not_numbers(numbered: str, lettered: str) -> None:
    # "(1)" read as a number made a list of parts look like arithmetic, which the router
    # sends to one call: the same request scored 0.04 numbered and 0.47 lettered.
    assert task_shape(numbered).parallel == pytest.approx(task_shape(lettered).parallel)
    assert task_shape(numbered).parts == task_shape(lettered).parts >= 2


@pytest.mark.parametrize(
    "task",
    [
        "Write three short pieces: (a) a haiku about rain, (b) a one-sentence definition of "
        "gravity, (c) a limerick about a cat.",
        "Answer each part: (a) What causes tides? (b) Why is the sky blue?",
        "Write a short story about a lighthouse keeper",
    ],
)
def test_the_reasons_given_point_toward_the_verdict(task: str) -> None:
    # "router 0.04 < 0.47 (parts=3 +2.4, listed +1.5, 'write' -1.4)" read as a reason to
    # split: the reasons shown are those that pushed toward the verdict, the base rate too.
    shape = task_shape(task)
    signs = [reason.rsplit(" ", 1)[1][0] for reason in shape.why]
    assert signs == ["+" if shape.splits else "-"] * 3
