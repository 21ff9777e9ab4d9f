"""The ``multipart`` suite: questions that mix general facts and calculations.

"Answer each part: (a) What is 17 * 23? (b) What is the capital of Kenya? (c) How many sides
does a hexagon have?" Each part is answered on its own, so decomposition can help quality (one
short context per part) and not only speed; an answer is right only when every part is in it.

The facts are general knowledge from a small built-in table; the calculations are random. The
checker compares words and numbers, not strings: case, accents, punctuation, ``391.0``,
``1,000`` and ``six`` all match; when the answer labels its parts ``(a)`` ``(b)`` ... each
part is looked for in its own section, otherwise the parts must appear in order.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FACTS", "Fact", "Question", "make_questions", "part_results", "tokens"]


@dataclass(frozen=True)
class Fact:
    """One general-knowledge question; ``answers`` are accepted spellings, canonical first."""

    question: str
    answers: tuple[str, ...]


def _capital(country: str, *answers: str) -> Fact:
    return Fact(f"What is the capital of {country}?", answers)


def _symbol(element: str, symbol: str) -> Fact:
    return Fact(f"What is the chemical symbol for {element}?", (symbol,))


def _sides(shape: str, sides: int) -> Fact:
    return Fact(f"How many sides does {shape} have?", (str(sides),))


FACTS: tuple[Fact, ...] = (
    _capital("France", "Paris"),
    _capital("Japan", "Tokyo"),
    _capital("Kenya", "Nairobi"),
    _capital("Italy", "Rome"),
    _capital("Canada", "Ottawa"),
    _capital("Australia", "Canberra"),
    _capital("Egypt", "Cairo"),
    _capital("Spain", "Madrid"),
    _capital("Germany", "Berlin"),
    _capital("Norway", "Oslo"),
    _capital("Peru", "Lima"),
    _capital("Brazil", "Brasília"),
    _capital("Argentina", "Buenos Aires"),
    _capital("Thailand", "Bangkok"),
    _capital("Greece", "Athens"),
    _symbol("gold", "Au"),
    _symbol("silver", "Ag"),
    _symbol("iron", "Fe"),
    _symbol("sodium", "Na"),
    _symbol("copper", "Cu"),
    _symbol("lead", "Pb"),
    _symbol("zinc", "Zn"),
    Fact("Which planet is closest to the Sun?", ("Mercury",)),
    Fact("What is the largest planet in the Solar System?", ("Jupiter",)),
    Fact("Which planet is known as the Red Planet?", ("Mars",)),
    Fact("Which planet is farthest from the Sun?", ("Neptune",)),
    Fact("How many planets are in the Solar System?", ("8",)),
    Fact("How many centimetres are in a metre?", ("100",)),
    Fact("How many grams are in a kilogram?", ("1000",)),
    Fact("How many minutes are in an hour?", ("60",)),
    Fact("How many hours are in a day?", ("24",)),
    Fact("How many days are in a leap year?", ("366",)),
    Fact("How many seconds are in an hour?", ("3600",)),
    _sides("a triangle", 3),
    _sides("a pentagon", 5),
    _sides("a hexagon", 6),
    _sides("an octagon", 8),
    _sides("a decagon", 10),
    Fact("What is the largest ocean on Earth?", ("Pacific",)),
    Fact("How many continents are there?", ("7",)),
    Fact("How many legs does a spider have?", ("8",)),
    Fact("At what temperature in degrees Celsius does water boil at sea level?", ("100",)),
    Fact("What gas do plants take from the air for photosynthesis?", ("carbon dioxide", "CO2")),
    Fact("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
)
"""The built-in table: capitals, chemical symbols, planets, units, shapes and a few more."""


@dataclass(frozen=True)
class Question:
    """One multi-part question: the parts, their canonical answers and accepted spellings."""

    parts: list[str]
    expected: list[str]
    answers: list[tuple[str, ...]]


_SMALL_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
)
_NUMBER_WORDS = {word: float(value) for value, word in enumerate(_SMALL_NUMBERS.split())}
# Thousands written 1 000 (a no-break or thin space): NFKD would make that an ordinary space.
_SPACED_THOUSANDS = re.compile(r"(?<=\d)[\u00a0\u2009\u202f](?=\d{3}(?!\d))")
# A number: thousands groups (1,000), a decimal part, a sign that is not a hyphen between two
# operands ("17-23").
_TOKEN = re.compile(
    r"(?P<number>(?:(?<![\w)])[-\u2212])?\d{1,3}(?:,\d{3})+(?:\.\d+)?"
    r"|(?:(?<![\w)])[-\u2212])?\d+(?:\.\d+)?)"
    r"|(?P<word>[^\W\d_]+)"
)
Token = str | float


def tokens(text: str) -> list[Token]:
    """Words (lower case, accents dropped) and numbers (as floats) of ``text``."""
    plain = unicodedata.normalize("NFKD", _SPACED_THOUSANDS.sub("", text))
    plain = "".join(c for c in plain if not unicodedata.combining(c)).casefold()
    out: list[Token] = []
    for match in _TOKEN.finditer(plain):
        number, word = match.group("number"), match.group("word")
        if number is not None:
            out.append(float(number.replace(",", "").replace("\u2212", "-")))
        elif word in _NUMBER_WORDS:
            out.append(_NUMBER_WORDS[word])
        else:
            out.append(word)
    return out


def _same(a: Token, b: Token) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 1e-9
    return a == b


def _find(haystack: Sequence[Token], needle: Sequence[Token], start: int) -> int | None:
    """End index of the first occurrence of ``needle`` at or after ``start``."""
    for i in range(start, len(haystack) - len(needle) + 1):
        if all(_same(haystack[i + j], t) for j, t in enumerate(needle)):
            return i + len(needle)
    return None


# Part labels, tried in this order: (a), a) a. a: Part a, (1), 1. 1).
_LABELS = (
    ("abcdefghijklmnop", r"\({}\)"),
    ("abcdefghijklmnop", r"(?<![\w\u00b0])(?:part\s+)?{}(?:\)|:|\.(?!\w))"),
    (range(1, 17), r"\({}\)"),
    (range(1, 17), r"(?<![\w.,])(?:part\s+)?{}(?:\)|:|\.(?!\d))"),
)


def _chain(answer: str, patterns: list[re.Pattern[str]], start: int) -> list[str] | None:
    """The sections after each label, if every label follows the previous one from ``start``."""
    cuts: list[tuple[int, int]] = []
    position = start
    for pattern in patterns:
        found = pattern.search(answer, position)
        if found is None:
            return None
        cuts.append((found.start(), found.end()))
        position = found.end()
    ends = [begin for begin, _ in cuts[1:]] + [len(answer)]
    return [answer[end:stop] for (_, end), stop in zip(cuts, ends, strict=True)]


def _sections(answer: str, count: int) -> list[str] | None:
    """The answer cut at its part labels, if it labels every part in order. The last such
    listing counts: a chain of thought that labels its steps ends with its final answer."""
    for names, template in _LABELS:
        patterns = [re.compile(template.format(n), re.IGNORECASE) for n in list(names)[:count]]
        for first in reversed(list(patterns[0].finditer(answer))):
            sections = _chain(answer, patterns, first.start())
            if sections is not None:
                return sections
    return None


def part_results(answer: str, answers: Sequence[Sequence[str]]) -> list[bool]:
    """Whether each part's answer (any accepted spelling) is in ``answer``."""
    spellings = [[tokens(a) for a in accepted] for accepted in answers]
    sections = _sections(answer, len(answers)) if len(answers) > 1 else None
    if sections is not None:
        return [
            any(_find(tokens(section), s, 0) is not None for s in accepted)
            for section, accepted in zip(sections, spellings, strict=True)
        ]
    # No labels: the parts must come in order, each after the previous one found.
    found: list[bool] = []
    words, position = tokens(answer), 0
    for accepted in spellings:
        ends = [e for e in (_find(words, s, position) for s in accepted) if e is not None]
        found.append(bool(ends))
        position = min(ends) if ends else position
    return found


def _calculation(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    if op == "+":
        a, b = a * rng.choice([1, 10]), b * rng.choice([1, 10])
    if op == "-":
        a, b = max(a, b) * 10 + rng.randint(0, 9), min(a, b)
    return f"What is {a} {op} {b}?", str(eval(f"{a} {op} {b}"))


def _checkable(items: Sequence[tuple[str, tuple[str, ...]]]) -> bool:
    """No two parts share an answer, and no answer is written in any question (an answer that
    echoes the questions would otherwise pass for a missing part)."""
    firsts = {tuple(tokens(answers[0])) for _, answers in items}
    asked = tokens(" ".join(question for question, _ in items))
    spellings = [tokens(a) for _, answers in items for a in answers]
    return len(firsts) == len(items) and all(_find(asked, s, 0) is None for s in spellings)


def make_questions(rng: random.Random, parts: int) -> Question:
    """A question of ``parts`` parts, about a third of them calculations (at least one), the
    rest facts, each part checkable on its own (see ``_checkable``)."""
    if parts < 2:
        raise ValueError(f"a multipart question needs at least 2 parts, not {parts}")
    calculations = max(1, round(parts / 3))
    while True:
        items = [(f.question, f.answers) for f in rng.sample(FACTS, parts - calculations)]
        items += [(q, (r,)) for q, r in (_calculation(rng) for _ in range(calculations))]
        if _checkable(items):
            break
    rng.shuffle(items)
    return Question([q for q, _ in items], [a[0] for _, a in items], [a for _, a in items])
