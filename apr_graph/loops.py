"""Degenerate repetition in streamed text: the model says the same thing again and again.

A loop is found while the text streams, as a run of words that repeats a block of ``p`` words
back to back, at least ``_min_repeats(p)`` times and over at least ``MIN_SPAN_WORDS`` words
(a block of 20 words or more at its second copy, shorter ones at their third: lists and
tables repeat short tokens legitimately). A numbered list's markers count as one word, so a
list that repeats its items under new numbers is a loop too. A runaway list repeats no block
but the same sentence in new items: a sentence of ``SENTENCE_WORDS`` words or more said for
the ``SENTENCE_REPEATS``-th time (outside code blocks) is a loop too.

A reply that writes out its own input again (a document from its top, ``copy_lines``
unchanged lines in a row; a quote from elsewhere, ``QUOTE_FACTOR`` times that) is cut where
the copy begins: the reader has those lines already. Copies are not watched when the task
asks for its documents changed or quoted (``asks_for_input_text``): there the copy is the
answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_PERIOD_WORDS",
    "MIN_SPAN_WORDS",
    "QUOTE_FACTOR",
    "SENTENCE_REPEATS",
    "SENTENCE_WORDS",
    "Loop",
    "LoopDetector",
    "asks_for_input_text",
    "tidy_cut",
]

MAX_PERIOD_WORDS = 300
"""The longest repeated block looked for, in words (a few paragraphs: a list of findings)."""

QUOTE_FACTOR = 3
"""A copy that is not a document written out again from its top (a quote) is cut only at
this many times ``copy_lines``."""

MIN_SPAN_WORDS = 30
"""The fewest repeated words that make a loop, whatever the block's length."""

SENTENCE_WORDS = 8
SENTENCE_REPEATS = 5
"""A sentence of ``SENTENCE_WORDS`` words or more said this often is a loop (in the runs kept
in ``data/decision/runs``, 5 times was always one, 4 times sometimes a sound answer)."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_SENTENCE_LEAD = re.compile(r"^[\s>*#\-\d.()]+")

_CHECK_EVERY = 4  # words between two looks at the tail: a loop is found this late at most
_WORD = re.compile(r"\S+")
_DOCUMENT_TAG = re.compile(r"<document\b[^>]*>|<context>")  # the next line is a document's top
_TOP_LINES = 3  # a rewrite may begin this many lines into a document (past a header comment)
_FENCE_INFO = re.compile(r"[\w+#.-]*")  # what may follow an opening code fence (``c++``)
_LIST_NUMBER = re.compile(r"\(?\d+[.):]")
"""A numbered list's marker (``16.``, ``3)``, ``(2)``): every one counts as the same word."""


@dataclass(frozen=True)
class Loop:
    """Where a loop was found.

    Attributes:
        keep: characters of the text to keep: everything before the first repeat.
        period_words: words in the repeated block.
        repeats: copies of the block seen when the loop was found.
        copied_lines: lines of its input a reply had copied (0 for a repeat of its own words).
    """

    keep: int
    period_words: int
    repeats: int
    copied_lines: int = 0


def _min_repeats(period: int) -> int:
    least = 2 if period >= 20 else 3
    return max(least, -(-MIN_SPAN_WORDS // period))


class _CopyWatch:
    """Consecutive lines of a reply that are consecutive lines of ``source`` (blank lines
    and indentation aside).

    A rewrite (a "revised file") starts at a document's top and goes on in order past its
    changed lines: it is cut after ``lines`` unchanged lines in a row. Any other copy is a
    quote, cut only at ``QUOTE_FACTOR`` times as many.
    """

    def __init__(self, source: str, lines: int) -> None:
        self._lines = lines
        self._source = [s for line in source.splitlines() if (s := line.strip())]
        self._at: dict[str, list[int]] = {}
        for index, line in enumerate(self._source):
            self._at.setdefault(line, []).append(index)
        tops = [i + 1 for i, line in enumerate(self._source) if _DOCUMENT_TAG.fullmatch(line)]
        self._tops = {top + skip for top in [0, *tops] for skip in range(_TOP_LINES)}
        self._matches: set[int] = set()  # where in the source the copy so far may end
        self._run = 0
        self._run_start = 0
        self._rewrite = False  # writing a document out again, from its top
        self._reached = -1  # the furthest source line the rewrite has come to
        self._scanned = 0

    def feed(self, text: str) -> Loop | None:
        """Look at the complete lines of ``text`` not seen yet."""
        end = text.rfind("\n") + 1
        for match in re.finditer(r"[^\n]*\n", text[self._scanned : end]):
            line = match.group().strip()
            if not line:
                continue
            if line.startswith("```"):  # a code block opens or closes: a rewrite ends
                self._matches, self._run, self._rewrite = set(), 0, False
                continue
            after = {i + 1 for i in self._matches if self._source[i + 1 : i + 2] == [line]}
            if after:
                self._matches, self._run = after, self._run + 1
            else:
                found = set(self._at.get(line, ()))
                if self._rewrite and (onward := {i for i in found if i > self._reached}):
                    found = onward  # the rewrite goes on past a change
                elif found & self._tops:
                    self._rewrite = True
                elif found:
                    self._rewrite = False  # a copy from the middle, or back: a quote
                self._matches, self._run = found, 1 if found else 0
                self._run_start = self._scanned + match.start()
            if self._matches:
                self._reached = max(self._reached, min(self._matches))
            needed = self._lines if self._rewrite else self._lines * QUOTE_FACTOR
            if self._run >= needed:
                return Loop(keep=self._run_start, period_words=0, repeats=1, copied_lines=self._run)
        self._scanned = max(self._scanned, end)
        return None


_INPUT_TEXT = re.compile(
    r"\b(fix(es|ed|ing)?|rewrit(e|es|ten|ing)|refactor\w*|edit(s|ed|ing)?|chang(e|es|ed|ing)"
    r"|modif(y|ies|ied|ying)|updat(e|es|ed|ing)|convert\w*|translat\w*|port(s|ed|ing)?"
    r"|migrat\w*|correct(s|ed|ing)?|add(s|ed|ing)?|insert\w*|remov(e|es|ed|ing)"
    r"|delet(e|es|ed|ing)|renam(e|es|ed|ing)|replac(e|es|ed|ing)|(re)?format\w*"
    r"|implement\w*|improv(e|es|ed|ing)|optimi[sz](e|es|ed|ing)|clean(s|ed|ing)?|patch\w*"
    r"|repair\w*|annotat\w*"
    r"|extract\w*|quot(e|es|ed|ing)|cop(y|ies|ied|ying)|excerpt\w*|cit(e|es|ed|ing)"
    r"|reproduc\w*|verbatim|print\w*|show(s|n|ing)?|paste\w*)\b",
    re.IGNORECASE,
)
"""Words that ask for a document changed or quoted: its lines are then the answer. A wrong
match only leaves a copy unwatched."""


def asks_for_input_text(*asks: str) -> bool:
    """Whether any of ``asks`` (a task, a thread's goal) asks for documents to be changed or
    quoted: a reply's copy of its input is then (part of) the answer."""
    return any(_INPUT_TEXT.search(ask) for ask in asks)


def tidy_cut(text: str) -> str:
    """A reply cut where it began copying its input, without the code fence it left open:
    an opening fence with nothing after it is dropped, one with lines in it is closed."""
    text = text.rstrip()
    if text.count("```") % 2 == 0:
        return text
    head, _, tail = text.rpartition("```")
    return head.rstrip() if _FENCE_INFO.fullmatch(tail.strip()) else f"{text}\n```"


class LoopDetector:
    """Fed streamed text piece by piece; ``feed`` returns the ``Loop`` once there is one.

    ``source``: the prompt the reply must not write out again, ``copy_lines`` lines at a
    time (0: not watched).
    """

    def __init__(self, source: str = "", copy_lines: int = 0) -> None:
        self._copies = _CopyWatch(source, copy_lines) if source and copy_lines else None
        self._text = ""
        self._words: list[str] = []
        self._starts: list[int] = []  # where each word starts in the text
        self._scanned = 0  # characters of the text already split into complete words
        self._since_check = 0
        self._said: dict[str, list[int]] = {}  # each sentence said so far: where its copies start
        self._sentence_from = 0
        self._in_code = False
        self.loop: Loop | None = None

    def feed(self, piece: str) -> Loop | None:
        """Take the next piece of text; the loop, once one is found (then always the same)."""
        if self.loop is not None or not piece:
            return self.loop
        self._text += piece
        if self._copies is not None and "\n" in piece:
            self.loop = self._copies.feed(self._text)
        new = self._split()
        self._since_check += new
        if self.loop is None and new and self._since_check >= _CHECK_EVERY:
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
