"""Task suites with checkable answers, generated locally from a seed (no downloads).

- ``arithmetic``: k independent sub-questions; every result must appear, in order.
- ``countdown``: reach a target with given numbers (each at most once, + - * /); the answer's
  expression is evaluated, never trusted.
- ``control``: single-step questions where splitting cannot help; measures what the adaptive
  decision costs.
- ``multipart``: general facts and calculations mixed in one question (see ``multipart``);
  every part must be in the answer, and the parts right are counted one by one.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apr_graph.bench.multipart import make_questions, part_results

__all__ = ["SUITES", "Task", "check_countdown", "make_suite", "safe_eval"]


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        suite / id: where it comes from.
        prompt: what the model is asked.
        parts: the independent sub-questions (for arithmetic) or approaches (countdown).
        expected: the reference results, in order.
        check: whether an answer is right.
        score: how many of the parts an answer gets right, out of how many (by default the
            whole task is one part).
        meta: facts the simulated model uses to script its replies.
        splits: whether the task has independent parts worth threads (the label the fork
            decision is checked against), ``None`` where it is a matter of taste.
    """

    suite: str
    id: str
    prompt: str
    parts: list[str]
    expected: list[str]
    check: Callable[[str], bool] = field(compare=False, repr=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    score: Callable[[str], tuple[int, int]] | None = field(default=None, compare=False, repr=False)
    splits: bool | None = None

    def part_score(self, answer: str) -> tuple[int, int]:
        """Parts right and parts in all, for ``answer``."""
        if self.score is not None:
            return self.score(answer)
        return int(self.check(answer)), 1


_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def safe_eval(expression: str) -> tuple[float, list[int]]:
    """Evaluate + - * / over integers; returns the value and the numbers used."""
    used: list[int] = []

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](walk(node.left), walk(node.right)))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            used.append(node.value)
            return float(node.value)
        raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:60]}")

    return walk(ast.parse(expression.strip(), mode="eval")), used


def check_countdown(answer: str, numbers: list[int], target: int) -> bool:
    """Whether the last expression in ``answer`` reaches ``target`` with ``numbers``."""
    candidates = re.findall(
        r"[\d\s()+\-*/]{3,}", answer.replace("\u00d7", "*").replace("\u00f7", "/")
    )
    for candidate in reversed(candidates):
        text = candidate.strip()
        if not re.search(r"\d\s*[+\-*/]\s*\(?\s*\d", text):
            continue
        try:
            value, used = safe_eval(text)
        except (ValueError, SyntaxError, ZeroDivisionError):
            continue
        pool = list(numbers)
        if all(n in pool and not pool.remove(n) for n in used):  # type: ignore[func-returns-value]
            return abs(value - target) < 1e-9
    return False


def _numbers_found(answer: str, expected: list[str]) -> tuple[int, int]:
    """How many of ``expected`` appear in order (a missing one is skipped), out of all."""
    position, found = 0, 0
    for value in expected:
        match = re.search(rf"(?<![\d.]){re.escape(value)}(?![\d])", answer[position:])
        if match is not None:
            found += 1
            position += match.end()
    return found, len(expected)


def _numbers_in_order(answer: str, expected: list[str]) -> bool:
    found, total = _numbers_found(answer, expected)
    return found == total


def _arithmetic(rng: random.Random, index: int, k: int) -> Task:
    parts, expected = [], []
    for _ in range(k):
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        op = rng.choice(["+", "*", "-"])
        parts.append(f"{a} {op} {b}")
        expected.append(str(eval(f"{a} {op} {b}")))
    labels = "abcdefghijklmnop"
    listing = " ".join(f"({labels[i]}) {p}" for i, p in enumerate(parts))
    prompt = f"Compute each of these independently and give every result: {listing}"
    return Task(
        "arithmetic",
        f"arithmetic-{index}",
        prompt,
        parts,
        expected,
        check=lambda answer: _numbers_in_order(answer, expected),
        meta={"labels": list(labels[:k])},
        score=lambda answer: _numbers_found(answer, expected),
        splits=True,
    )


def _countdown(rng: random.Random, index: int) -> Task:
    while True:
        numbers = [rng.randint(1, 12) for _ in range(3)] + [rng.choice([25, 50, 75, 100])]
        a, b, c, d = rng.sample(numbers, 4)
        op1, op2, op3 = (rng.choice("+-*") for _ in range(3))
        solution = f"(({a} {op1} {b}) {op2} {c}) {op3} {d}"
        target = int(safe_eval(solution)[0])
        if 10 <= target <= 999:
            break
    starts = [f"start from {n}" for n in numbers]
    prompt = (
        f"Countdown: using the numbers {numbers} (each at most once) and + - * /, "
        f"reach exactly {target}. Give the expression."
    )
    return Task(
        "countdown",
        f"countdown-{index}",
        prompt,
        starts,
        [solution],
        check=lambda answer: check_countdown(answer, numbers, target),
        meta={"numbers": numbers, "target": target, "solution": solution, "first": a},
    )


def _control(rng: random.Random, index: int) -> Task:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    prompt = f"What is {a} + {b}?"
    expected = [str(a + b)]
    return Task(
        "control",
        f"control-{index}",
        prompt,
        [f"{a} + {b}"],
        expected,
        check=lambda answer: _numbers_in_order(answer, expected),
        splits=False,
    )


def _multipart(rng: random.Random, index: int, k: int) -> Task:
    question = make_questions(rng, k)
    labels = "abcdefghijklmnop"[:k]
    listing = " ".join(
        f"({label}) {part}" for label, part in zip(labels, question.parts, strict=True)
    )
    answers = question.answers

    def score(answer: str) -> tuple[int, int]:
        results = part_results(answer, answers)
        return sum(results), len(results)

    def check(answer: str) -> bool:
        return all(part_results(answer, answers))

    return Task(
        "multipart",
        f"multipart-{index}",
        f"Answer each part: {listing}",
        question.parts,
        question.expected,
        check=check,
        meta={"labels": list(labels)},
        score=score,
        splits=True,
    )


SUITES = ("arithmetic", "countdown", "control", "multipart")


def make_suite(name: str, count: int, *, seed: int = 0, parts: int = 4) -> list[Task]:
    """``count`` tasks of suite ``name`` (arithmetic and multipart tasks have ``parts``
    sub-questions)."""
    rng = random.Random(f"{name}-{seed}")
    if name == "arithmetic":
        return [_arithmetic(rng, i, parts) for i in range(count)]
    if name == "countdown":
        return [_countdown(rng, i) for i in range(count)]
    if name == "control":
        return [_control(rng, i) for i in range(count)]
    if name == "multipart":
        return [_multipart(rng, i, parts) for i in range(count)]
    raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
