"""Thread answers compared: the final answer of a reply, and the majority among several."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

__all__ = ["final_answer", "majority", "normalise_answer"]

_FINAL = re.compile(r"final answer\s*[:\uff1a]\s*(.+)", re.I)


def final_answer(text: str) -> str:
    """The final answer of a thread: after its last 'Final answer:', else its last line."""
    found = _FINAL.findall(text)
    if found:
        return str(found[-1]).strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalise_answer(answer: str) -> str:
    """A form of an answer in which equal answers compare equal."""
    cleaned = re.sub(r"[*$`\\]|\\boxed\{|\}", "", answer).strip().rstrip(".").lower()
    return re.sub(r"\s+", " ", cleaned)


def majority(votes: Mapping[str, str]) -> tuple[str, int, int]:
    """``(voter, lead, runner_up)``: the first voter of the most common answer, its count,
    and the count of the next answer (0 if none). ``votes`` maps voter ids to answers."""
    counts = Counter(votes.values()).most_common()
    leader, lead = counts[0]
    runner_up = counts[1][1] if len(counts) > 1 else 0
    return next(v for v, a in votes.items() if a == leader), lead, runner_up
