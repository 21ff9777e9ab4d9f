"""The answer of a native reasoner: what follows its reasoning, not the reasoning's tail."""

from __future__ import annotations

import re

__all__ = ["final_answer"]

_THINK_END = re.compile(r"</think>", re.I)
# Multiverse writes "Answer: ..." after </Think>; its published traces end at </Think> with a
# "**Final Answer**" line or a \boxed{} inside the reasoning.
_FINAL = re.compile(r"^\**Final Answer\**:?[ \t]*\n?", re.M)
_BOXED = "\\boxed{"


def final_answer(text: str, block_close: str = "</Parallel>") -> str:
    """The model's final answer in ``text``.

    In order: what follows the last ``</think>`` / ``</Think>``; else the part after the last
    ``Final Answer`` line; else the last ``\\boxed{...}``; else what follows the last
    ``block_close``; else the whole text. Never empty when ``text`` is not.
    """
    ends = list(_THINK_END.finditer(text))
    reasoning = text[: ends[-1].start()] if ends else text
    if ends and text[ends[-1].end() :].strip():
        return text[ends[-1].end() :].strip()
    finals = list(_FINAL.finditer(reasoning))
    if finals and reasoning[finals[-1].end() :].strip():
        return reasoning[finals[-1].end() :].strip()
    boxed = _last_boxed(reasoning)
    if boxed is not None:
        return boxed
    # Without a block_close, rpartition's tail is the whole reasoning.
    return reasoning.rpartition(block_close)[2].strip() or reasoning.strip() or text.strip()


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), if any."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index].strip()
    return None
