"""The tags of ThreadWeaver and Multiverse, and how their engines fork and join a block.

Both reference engines (``facebookresearch/threadweaver``, ``Swapnil-Gandhi/Multiverse-Engine``)
are followed to the byte, because a trained model continues from the joined text exactly as it
saw it in training. Only numbered outlines (``N:`` / ``N.M:``) fork, each number once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from apr_graph.errors import AprError

__all__ = ["FORMATS", "NativeFormat", "NativeProtocolError", "Outline"]

_OUTLINE = re.compile(r"<Outline>\s*(\d+(?:\.\d+)*)\s*:\s*(.*?)\s*</Outline>", re.S)


class NativeProtocolError(AprError):
    """A native run got text that its model's protocol rules out (e.g. no tags at all, the
    sign of a server that drops special tokens); the message says what to change."""


@dataclass(frozen=True)
class Outline:
    """One numbered outline of a block: its number (``"2"``, ``"1.3"``) and its text."""

    label: str
    goal: str


@dataclass(frozen=True)
class NativeFormat:
    """The tags, training prompt and join of one family of native parallel reasoners.

    Attributes:
        name: the ``AprSettings.native`` value.
        outlines_open / outlines_close: the tags around a block's outlines; the engine stops
            the model at ``outlines_close`` and forks.
        thread_open / thread_close: the tags around one thread.
        after_join: what the engine appends after the joined threads.
        tight_join: threads after the first are joined without their leading newline.
        special_tags: tags that are added special tokens of the model, some of which every
            answer of the model contains (none at all means the server dropped them).
        prompt: the raw prompt the model was trained on; ``{task}`` and ``{context}``.
    """

    name: str
    outlines_open: str
    outlines_close: str
    thread_open: str
    thread_close: str
    after_join: str
    tight_join: bool
    special_tags: tuple[str, ...]
    prompt: str
    block_open: str = "<Parallel>"
    block_close: str = "</Parallel>"

    def outlines(self, text: str) -> list[Outline]:
        """The numbered outlines of the last block in ``text``, each number once."""
        block = text[text.rfind(self.outlines_open) :]
        seen: dict[str, Outline] = {}
        for label, goal in _OUTLINE.findall(block):
            seen.setdefault(label, Outline(label, goal))
        return list(seen.values())

    def header(self, label: str) -> str:
        """What a thread's prompt ends with: the model writes the rest of the thread."""
        return f"\n{self.thread_open}\n{label}:"

    def join(self, threads: list[tuple[str, str]]) -> str:
        """The text that follows the outlines once all ``(label, body)`` threads are done."""
        parts = []
        for index, (label, body) in enumerate(threads):
            header = self.header(label)[1 if self.tight_join and index else 0 :]
            parts.append(f"{header}{body}{self.thread_close}")
        return "".join(parts) + self.after_join

    def open_blocks(self, text: str) -> int:
        """Blocks opened in ``text`` and not closed in it."""
        return text.count(self.block_open) - text.count(self.block_close)

    def in_outlines(self, text: str) -> bool:
        """Whether ``text`` ends inside an outlines block (so its end stopped the model)."""
        return text.rfind(self.outlines_open) > text.rfind(self.outlines_close)


FORMATS = {
    "threadweaver": NativeFormat(
        name="threadweaver",
        outlines_open="<Outlines>",
        outlines_close="</Outlines>",
        thread_open="<Thread>",
        thread_close="</Thread>",
        after_join="\n",  # its RL runs set no_conclusion=true
        tight_join=True,
        # Qwen3's <think> survives skip_special_tokens, so only the block tags prove anything.
        special_tags=("<Parallel>", "<Outlines>", "<Outline>", "<Thread>"),
        # Qwen3's chat template and ThreadWeaver's training instruction
        # (data_generation/src/generated_data_to_training_data_polaris.py).
        prompt="<|im_start|>user\n{task}{context} Let's think step by step and output the "
        "final answer within \\boxed{{}}.<|im_end|>\n<|im_start|>assistant\n",
    ),
    "multiverse": NativeFormat(
        name="multiverse",
        outlines_open="<Goal>",
        outlines_close="</Goal>",
        thread_open="<Path>",
        thread_close="</Path>",
        after_join="\n<Conclusion>\n",
        tight_join=False,
        special_tags=("<Think>", "</Think>", "<Parallel>", "<Goal>", "<Path>"),
        # Qwen2.5's chat template (its default system prompt) and Multiverse's training cue
        # (data/tokenization_multiverse.py).
        prompt="<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\n{task}{context} Think step by step and in "
        "parallel before answering.<|im_end|>\n<|im_start|>assistant\n",
    ),
}
