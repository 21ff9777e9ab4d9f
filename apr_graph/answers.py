"""Thread answers compared: the final answer of a reply, and the majority among several."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

__all__ = [
    "dead_end",
    "final_answer",
    "kept_in",
    "majority",
    "normalise_answer",
    "without_empty_final",
]

_FINAL = re.compile(r"final answer\s*[:\uff1a]\s*(.+)", re.I)
_EMPTY_FINAL = re.compile(r"[\s*_#]*final answer\s*[:\uff1a][\s*_]*\Z", re.I)
_DEAD_END = re.compile(r"^[\s>*_#`-]*DEAD END\b[\s*_:.-]*", re.I)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_LIST_MARK = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*+\u2022])\s+")  # "6. " is no result


def dead_end(text: str) -> str | None:
    """Why a thread's reply gives up, if its last or first line says "DEAD END" (a DEAD END
    mentioned mid-way does not count); else ``None``."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    for line, reason in ((lines[-1], lines[-1]), (lines[0], text.strip())):
        if found := _DEAD_END.match(line):  # the first line's reason runs to the end
            return (reason[found.end() :].strip() or "no reason given")[:300]
    return None


def without_empty_final(text: str) -> str:
    """``text`` without a closing "Final answer:" that states nothing: the model gave the
    result before it ("17 * 23 = 391 Final answer:")."""
    return _EMPTY_FINAL.sub("", text)


_SHORT_WORDS = 4
"""An answer this short ("Carbon dioxide", "blue whale") is its words."""

_COMMON = frozenset(
    "that this with from they them their there these those which what when where have been "  # noqa: SIM905
    "were will would could should about into than then also only each both answer".split()
)


def kept_in(answer: str, merged: str) -> bool | None:
    """Whether a merged answer still holds a thread's result: its final answer whole (case,
    spacing and markup aside), else its last number, else one of its names (capitalised words
    after the first); ``None`` when it has neither (prose, or a short answer: ``words_in``)."""
    raw = _LIST_MARK.sub("", final_answer(answer))  # a list's last item, not its number
    final = normalise_answer(raw)
    whole = normalise_answer(merged)
    if not final or final in whole:
        return True
    numbers = _NUMBER.findall(final)
    if numbers:
        wanted = numbers[-1].replace(",", "")
        return wanted in {n.replace(",", "") for n in _NUMBER.findall(whole)}
    names = re.findall(r"(?<=\s)[^\W\d_a-z][^\W\d_]+", raw)
    if names:
        return any(re.search(rf"\b{re.escape(n.lower())}\b", whole) for n in names)
    return None


def words_in(answer: str, merged: str) -> bool | None:
    """For a short final answer without numbers or names: whether one of its words (four
    letters or more, a plural or tense aside) is in the merge; ``None`` for any other."""
    final = normalise_answer(final_answer(answer))
    words = [w for w in re.findall(r"[^\W\d_]{4,}", final) if w not in _COMMON]
    if len(final.split()) > _SHORT_WORDS or not words:
        return None
    whole = normalise_answer(merged)
    return any(re.search(rf"\b{re.escape(w[: max(4, len(w) - 2)])}", whole) for w in words)


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
