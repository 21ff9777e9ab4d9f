"""Degenerate repetition in streamed text: the model says the same thing again and again.

Small models loop, and large ones do too on long outputs: a thread that loops runs on to its
token limit, and a retry with more room loops on to that one. A loop is found while the text
streams, as a run of words that repeats a block of ``p`` words back to back: at least
``_min_repeats(p)`` times, and over at least ``MIN_SPAN_WORDS`` words. Exact repetition of a
block of 20 words or more is read as a loop at its second copy; shorter blocks need a third
copy, and a block of a few words needs a span of ``MIN_SPAN_WORDS`` (a list or a table row
repeats short tokens legitimately, a sentence does not repeat verbatim). A numbered list's
markers count as one word, so a list that repeats its items under new numbers is a loop too
(a 1.5B model reviewing code listed the same eight findings as 8-15, 16-23, 24-31...). Longer
blocks than ``MAX_PERIOD_WORDS`` are not looked for.

A list that runs away repeats no block: each item is new, with the same sentence in it ("It's
also a great place to take photos.", "This is a risky code because it can lead to unexpected
behavior or crashes."). So a sentence of ``SENTENCE_WORDS`` words or more said for the
``SENTENCE_REPEATS``-th time (outside code blocks, in any case, list markers aside) is a loop
too, cut where that sentence starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_PERIOD_WORDS",
    "MIN_SPAN_WORDS",
    "SENTENCE_REPEATS",
    "SENTENCE_WORDS",
    "Loop",
    "LoopDetector",
]

MAX_PERIOD_WORDS = 300
"""The longest repeated block looked for (a few paragraphs): a 1.5B model reviewing code
cycled through eight findings of ~25 words each (a 200-word block) until its limit, twice,
when blocks of up to 150 words were looked for."""

MIN_SPAN_WORDS = 30
"""The fewest repeated words that make a loop, whatever the block's length."""

SENTENCE_WORDS = 8
SENTENCE_REPEATS = 5
"""In 827 replies of a 1.5B model kept in this repository's runs (``data/decision/runs``,
reviews, GSM8K, open questions), a sentence of 8+ words came 5 times or more in 23, every one
a loop or a list running away (travel tips, museums, findings); 4 times in 11, some of them
sound (a plain review said "If the value is not numeric, it will raise a `ValueError`." four
times, once per function)."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_SENTENCE_LEAD = re.compile(r"^[\s>*#\-\d.()]+")

_CHECK_EVERY = 4
"""Words between two looks at the tail (a loop is found at most this many words late)."""

_WORD = re.compile(r"\S+")
_LIST_NUMBER = re.compile(r"\(?\d+[.):]")
"""A numbered list's marker (``16.``, ``3)``, ``(2)``): a list that loops renumbers each copy
of its items, so every marker counts as the same word."""


@dataclass(frozen=True)
class Loop:
    """Where a loop was found.

    Attributes:
        keep: characters of the text to keep: everything before the first repeat (the block
            itself is said once).
        period_words: words in the repeated block.
        repeats: copies of the block seen when the loop was found.
    """

    keep: int
    period_words: int
    repeats: int


def _min_repeats(period: int) -> int:
    least = 2 if period >= 20 else 3
    return max(least, -(-MIN_SPAN_WORDS // period))


class LoopDetector:
    """Fed streamed text piece by piece; ``feed`` returns the ``Loop`` once there is one."""

    def __init__(self) -> None:
        self._text = ""
        self._words: list[str] = []
        self._starts: list[int] = []
        """Where each word starts in the text."""
        self._scanned = 0
        """Characters of the text already split into complete words."""
        self._since_check = 0
        self._said: dict[str, list[int]] = {}
        """Each sentence said so far: where each of its copies starts."""
        self._sentence_from = 0
        self._in_code = False
        self.loop: Loop | None = None

    def feed(self, piece: str) -> Loop | None:
        """Take the next piece of text; the loop, once one is found (then always the same)."""
        if self.loop is not None or not piece:
            return self.loop
        self._text += piece
        new = self._split()
        self._since_check += new
        if new and self._since_check >= _CHECK_EVERY:
            self._since_check = 0
            self.loop = self._look() or self._sentences()
        return self.loop

    def _sentences(self) -> Loop | None:
        """The loop of a sentence said ``SENTENCE_REPEATS`` times, among those completed."""
        text = self._text
        for end in _SENTENCE_END.finditer(text, self._sentence_from):
            start, self._sentence_from = self._sentence_from, end.end()
            raw = text[start : end.start()]
            if raw.lstrip().startswith("```"):
                self._in_code = not self._in_code
                continue
            sentence = " ".join(_SENTENCE_LEAD.sub("", raw).lower().split())
            if self._in_code or sentence.count(" ") < SENTENCE_WORDS - 1:
                continue
            said = self._said.setdefault(sentence, [])
            said.append(start + len(raw) - len(raw.lstrip()))
            if len(said) >= SENTENCE_REPEATS:
                between = len(text[said[0] : said[-1]].split())
                return Loop(
                    keep=said[-1],
                    period_words=max(1, between // (len(said) - 1)),
                    repeats=len(said),
                )
        return None

    def _split(self) -> int:
        """Split the text up to its last white space (the word after it may go on in the
        next piece) into words; returns how many were added."""
        text = self._text
        end = len(text)
        while end > self._scanned and not text[end - 1].isspace():
            end -= 1
        added = 0
        for match in _WORD.finditer(text, self._scanned, end):
            word = match.group()
            self._words.append("#." if _LIST_NUMBER.fullmatch(word) else word)
            self._starts.append(match.start())
            added += 1
        self._scanned = max(self._scanned, end)
        return added

    def _look(self) -> Loop | None:
        """The loop at the end of the complete words, if any (the shortest block first)."""
        words = self._words
        count = len(words)
        for period in range(1, min(MAX_PERIOD_WORDS, count // 2) + 1):
            repeats = _min_repeats(period)
            span = period * repeats
            if span > count:
                continue
            tail = count - span
            if words[-1] != words[-1 - period]:
                continue  # the last word is in every check below: most periods end here
            if all(words[i] == words[i + period] for i in range(tail, count - period)):
                start = tail
                while start > 0 and words[start - 1] == words[start - 1 + period]:
                    start -= 1  # the repetition began earlier than the tail looked at
                first_repeat = start + period
                return Loop(
                    keep=self._starts[first_repeat],
                    period_words=period,
                    repeats=(count - start) // period,
                )
        return None
