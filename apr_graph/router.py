"""The task's shape before any model call: one continuous piece, or parts written in parallel.

A small planner splits almost everything (issue #33), so a logistic regression shipped as
data (``router.json``, trained by ``scripts/train_router.py`` on ``data/decision/``) on word
unigrams, bigrams and a few structural counts decides first: a task it calls one piece is
answered directly, with no planning call.

Example:
    >>> shape = task_shape("Write a short story about a lighthouse keeper")
    >>> shape.splits
    False
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from apr_graph.plan import labelled_parts, part_markers

__all__ = ["Shape", "count_parts", "features", "task_shape", "without_labels"]

FORMAT = 2  # the feature recipe below; router.json names the one it was trained with
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+(?:[.,]\d+)*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s", re.M)
# "Problem 1: ... Problem 2: ..." are labelled parts too, though not the ones the planner's
# schema lists (labelled_parts knows "(a)", "a)", "(1)", "1)" and "1.").
_HEADING = re.compile(r"(?:^|(?<=\s))(?:problem|question|task|part|q)\s*(\d{1,2})\s*[:.)]", re.I)


@dataclass(frozen=True)
class Shape:
    """The router's verdict on one task."""

    parallel: float
    """Probability that the answer splits into independent parts (0..1)."""
    threshold: float
    """The shipped decision threshold (chosen by cross-validation on the development data)."""
    parts: int
    """Labelled parts found in the task ("(a)", "1.", "Problem 1:" ...), 0 if none."""
    why: tuple[str, ...]
    """The three terms that weighed most toward the verdict (the base rate among them), e.g.
    ``("parts=3 +1.8", "'list' +0.8", "listed +1.1")``."""

    @property
    def splits(self) -> bool:
        """Whether the task should go to the planner (parallel >= threshold)."""
        return self.parallel >= self.threshold


def count_parts(task: str) -> int:
    """Labelled parts of the task: those the planner knows, or numbered headings from 1."""
    listed = len(labelled_parts(task))
    expected = 1
    for match in _HEADING.finditer(task):
        if int(match.group(1)) == expected:
            expected += 1
    return max(listed, expected - 1 if expected > 2 else 0)


def without_labels(task: str) -> str:
    """The task with its parts' labels blanked out (the same length, so nothing else moves)."""
    chars = list(task)
    for start, end in part_markers(task):
        chars[start:end] = " " * (end - start)
    headings = list(_HEADING.finditer(task))
    if headings and count_parts(task) >= 2:
        for match in headings:
            chars[match.start(1) : match.end(1)] = " " * (match.end(1) - match.start(1))
    return "".join(chars)


def features(task: str) -> dict[str, float]:
    """A task's features: n-grams (``w:``), its first word (``f:``), structure (``s:``).

    N-grams count once however often they occur; numbers are one token, ``<num>``. The labels
    of a task's parts ("(1)", "b)", "Problem 2:") are neither words nor numbers: "(1)" and
    "(a)" read alike, and a list's labels do not make it look like arithmetic.
    """
    text = without_labels(task)
    words = ["<num>" if w[0].isdigit() else w for w in _WORD.findall(text.lower())]
    grams = set(words) | {f"{a} {b}" for a, b in itertools.pairwise(words)}
    found = {f"w:{g}": 1.0 for g in grams}
    if words:
        found[f"f:{words[0]}"] = 1.0
    parts = count_parts(task)
    questions = task.count("?")
    lines = [line for line in task.splitlines() if line.strip()]
    numbers = len(_NUMBER.findall(text))
    found.update(
        {
            "s:parts": math.log1p(parts),
            "s:listed": float(parts >= 2),
            "s:questions": math.log1p(questions),
            "s:several_questions": float(questions >= 2),
            "s:sentences": math.log1p(len(_SENTENCE_END.findall(text))),
            "s:length": math.log1p(len(words)) / 5.0,  # ~1 at 150 words, like the others
            "s:numbers": math.log1p(numbers),
            "s:has_number": float(numbers > 0),
            "s:lines": math.log1p(max(len(lines) - 1, 0)),
            "s:bullets": math.log1p(len(_BULLET.findall(task))),
            "s:ends_with_question": float(task.rstrip().endswith("?")),
        }
    )
    return found


@functools.cache
def _model() -> dict[str, Any]:
    text = resources.files("apr_graph").joinpath("router.json").read_text(encoding="utf-8")
    model: dict[str, Any] = json.loads(text)
    if model.get("format") != FORMAT:
        raise RuntimeError(
            f"router.json has feature format {model.get('format')!r}, this code reads {FORMAT}: "
            "re-run scripts/train_router.py"
        )
    return model


def _label(name: str, value: float) -> str:
    kind, _, rest = name.partition(":")
    if kind == "w":
        return f"'{rest}'"
    if kind == "f":
        return f"starts '{rest}'"
    if rest in {"parts", "questions", "numbers", "sentences", "lines", "bullets"}:
        return f"{rest}={round(math.expm1(value))}"
    if rest == "length":
        return f"words={round(math.expm1(value * 5.0))}"
    return rest if value else f"not {rest}"


def task_shape(task: str, context: str = "") -> Shape:
    """How the task's answer is shaped: one continuous piece, or independent parts (then
    ``shape.splits``: planning is worthwhile). ``context`` is ignored: documents say what to
    answer from, not whether the answer has parts, and their words would outvote the request's.
    """
    del context
    model = _model()
    weights: dict[str, float] = model["weights"]
    found = features(task)
    contributions = {
        name: weights[name] * value for name, value in found.items() if name in weights and value
    }
    # fsum: the sum of a set's features must not depend on the order of the set (the hash seed)
    z = math.fsum([float(model["bias"]), *contributions.values()])
    parallel = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    splits = parallel >= float(model["threshold"])
    # The verdict is explained by what pushed toward it (the base rate too), then the rest.
    terms = [(_label(name, found[name]), c) for name, c in contributions.items()]
    terms.append(("base rate", float(model["bias"])))
    top = sorted(terms, key=lambda t: ((t[1] > 0) != splits, -abs(t[1]), t[0]))[:3]
    why = tuple(f"{label} {c:+.1f}" for label, c in top)
    return Shape(parallel, float(model["threshold"]), count_parts(task), why)
