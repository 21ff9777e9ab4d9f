"""Degenerate repetition in streamed text: the model says the same thing again and again.

Found while the text streams: a block of words repeated back to back (``_min_repeats``; a
numbered list's markers count as one word, so items repeated under new numbers are a loop);
a sentence said for the ``SENTENCE_REPEATS``-th time; a list whose items say what earlier ones
said with other names (``ITEM_NOVELTY``), or whose short items all open alike
(``SHORT_ITEM_RUN``). A reply that writes out its own input again (``copy_lines`` unchanged
lines in a row from a document's top; a quote, ``QUOTE_FACTOR`` times that) is cut where the
copy begins, unless the task asks for its documents changed or quoted
(``asks_for_input_text``): there the copy is the answer.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

__all__ = [
    "ITEM_NOVELTY",
    "ITEM_REPEATS",
    "ITEM_WINDOW",
    "ITEM_WORDS",
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

ITEM_WORDS = 15
ITEM_NOVELTY = 0.3
ITEM_REPEATS = 3
ITEM_WINDOW = 5
"""A list item of ``ITEM_WORDS`` words or more with under ``ITEM_NOVELTY`` of its word 4-grams
new to its list (its last 32 items; names in code spans and their words in prose read alike,
numbers do not) repeats a template; one that makes ``ITEM_REPEATS`` of the last
``ITEM_WINDOW`` items is a loop, cut where it starts. A heading, or a list numbered from 1
again, starts afresh. Of the 754 replies in ``data/decision/runs`` before session 23 it fired
in 41, each a runaway list or a loop; at 0.4 it would also cut a sound list of usage examples
(items 0.28-0.35 new)."""

SHORT_ITEM_WORDS = 8
SHORT_ITEM_RUN = 10
"""``SHORT_ITEM_RUN`` list items in a row of 3 to ``SHORT_ITEM_WORDS`` words that open with the
same two ("Good for testing", "Good for debugging", ... 46 by Qwen2.5-1.5B asked for pros
and cons) are a loop, cut at the last. No reply in ``data/decision/runs`` has more than 6."""

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


_LINE = re.compile(r"[^\n]*\n")
_ITEM = re.compile(r"([ \t]*)(?:\d+[.)]|[-*+])[ \t]")
_FIRST_ITEM = re.compile(r"[ \t]*1[.)][ \t]")
_SECTION = re.compile(r"#|\*\*[^*]+\*\*:?$")  # a heading, or a bold line of its own
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_ITEM_WORD = re.compile(r"`c`|[\w']+")
_NAME_PART = re.compile(r"[^\W\d_]{3,}")  # a word of a name in a code span: `lexical_diversity`
_MARKER_CHARS = 8  # a line this short may be a list item's marker still being written
_ITEM_MEMORY = 32  # the items an item is compared with (``ITEM_NOVELTY``): linear time


class _ListWatch:
    """List items that repeat a template (``ITEM_NOVELTY``), judged as each one ends: at the
    next item of the list's top level, or at a heading. Code blocks in an item are not read:
    usage examples repeat their set-up legitimately."""

    def __init__(self) -> None:
        self._scanned = 0
        self._start: int | None = None  # where the open item starts
        self._lines: list[str] = []  # its text, code blocks aside
        self._indent: int | None = None  # the indentation of the list's top-level markers
        # the list's last items: their words, and their 4-grams under the names known so far
        self._items: deque[tuple[list[str], set[tuple[str, ...]]]] = deque(maxlen=_ITEM_MEMORY)
        self._names: set[str] = set()  # the words of the names its code spans gave
        self._recent: deque[bool] = deque(maxlen=ITEM_WINDOW)  # templated, for the last items
        self._lead: tuple[str, ...] = ()  # the first two words of the last short items
        self._run = 0  # how many short items in a row open with them
        self._in_code = False

    def feed(self, text: str, end: int) -> Loop | None:
        """Look at the complete lines of ``text`` (those before ``end``) not seen yet."""
        for match in _LINE.finditer(text, self._scanned, end):
            line = match.group()
            if line.lstrip().startswith("```"):
                self._in_code = not self._in_code
                continue
            if self._in_code:
                continue
            marker = _ITEM.match(line)
            top = marker is not None and (
                self._indent is None or len(marker.group(1)) <= self._indent
            )
            section = _SECTION.match(line.strip()) is not None
            if (top or section) and (loop := self._judge()) is not None:
                return loop
            if section or (top and _FIRST_ITEM.match(line)):
                self._items.clear()
                self._names.clear()
                self._recent.clear()
                self._lead, self._run = (), 0
            if marker is None and not section and line[:1].strip():
                self._lead, self._run = (), 0  # a line of prose ("Cons:") between lists
            if top and marker is not None:
                if self._indent is None:
                    self._indent = len(marker.group(1))
                self._start, self._lines = match.start(), [line[marker.end() :]]
            elif self._start is not None and not section:
                self._lines.append(line)
        self._scanned = max(self._scanned, end)
        # The next item's marker ends the open item before the rest of its line has come.
        marker = None if self._in_code else _ITEM.match(text, end)
        if marker is None or self._indent is None or len(marker.group(1)) > self._indent:
            return None
        return self._judge()

    def _judge(self) -> Loop | None:
        """The loop the open item completes, if it does."""
        start = self._start
        if start is None:
            return None
        self._start = None
        text = "".join(self._lines).lower()
        names = {
            part.rstrip("s")
            for span in _CODE_SPAN.findall(text)
            for part in _NAME_PART.findall(span)
        }
        words = _ITEM_WORD.findall(_CODE_SPAN.sub(" `c` ", text))
        if not names <= self._names:  # earlier items are read again with them masked alike
            self._names |= names
            self._items = deque(
                ((item, self._grams(item)) for item, _ in self._items), maxlen=_ITEM_MEMORY
            )
        short = 2 < len(words) <= SHORT_ITEM_WORDS
        lead = tuple(words[:2]) if short else ()
        self._run = self._run + 1 if lead and lead == self._lead else int(short)
        self._lead = lead
        if self._run >= SHORT_ITEM_RUN:
            return Loop(keep=start, period_words=len(words), repeats=self._run)
        seen = set().union(*(item_grams for _, item_grams in self._items))
        grams = self._grams(words)
        self._items.append((words, grams))
        templated = len(words) >= ITEM_WORDS and len(grams - seen) < ITEM_NOVELTY * len(grams)
        self._recent.append(templated)
        if not templated or sum(self._recent) < ITEM_REPEATS:
            return None
        return Loop(keep=start, period_words=len(words), repeats=sum(self._recent) + 1)

    def _grams(self, words: list[str]) -> set[tuple[str, ...]]:
        """The word 4-grams of an item, the words of the list's names read as one."""
        masked = ["`c`" if word.rstrip("s") in self._names else word for word in words]
        return {tuple(masked[i : i + 4]) for i in range(len(masked) - 3)}


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

    def feed(self, text: str, end: int) -> Loop | None:
        """Look at the complete lines of ``text`` (those before ``end``) not seen yet."""
        for match in _LINE.finditer(text, self._scanned, end):
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
                self._run_start = match.start()
            # A line or two alike may be changed lines worded as lines further down the file:
            # the rewrite has reached a place only when three lines in a row say so.
            if self._run >= 3:
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
        self._lists = _ListWatch()
        self._text = ""
        self._words: list[str] = []
        self._starts: list[int] = []  # where each word starts in the text
        self._scanned = 0  # characters of the text already split into complete words
        self._since_check = 0
        self._said: dict[str, list[int]] = {}  # each sentence said so far: where its copies start
        self._sentence_from = 0
        self._in_code = False
        self._line_start = 0  # where the text's last line starts
        self.loop: Loop | None = None

    def feed(self, piece: str) -> Loop | None:
        """Take the next piece of text; the loop, once one is found (then always the same)."""
        if self.loop is not None or not piece:
            return self.loop
        self._text += piece
        if (newline := piece.rfind("\n")) >= 0:
            self._line_start = len(self._text) - len(piece) + newline + 1
            if self._copies is not None:
                self.loop = self._copies.feed(self._text, self._line_start)
            self.loop = self.loop or self._lists.feed(self._text, self._line_start)
        elif len(self._text) - self._line_start <= _MARKER_CHARS + len(piece):
            # A list item's marker may be coming in.
            self.loop = self._lists.feed(self._text, self._line_start)
        new = self._split(len(piece))
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

    def _split(self, new: int) -> int:
        """Split the text up to its last white space (the word after it may go on in the
        next piece) into words; returns how many were added. Only the last ``new``
        characters are looked at for it: a long run without white space costs no more."""
        text = self._text
        end = len(text)
        start = max(self._scanned, end - new)
        while end > start and not text[end - 1].isspace():
            end -= 1
        if end == start:
            return 0  # no white space came in
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
