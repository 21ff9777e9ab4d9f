"""A server that replays a native reasoner's published trace, for testing native setups.

``ReplayServer(trace, prompt=...)`` answers ``/v1/completions`` as the model that wrote
``trace`` would: a request's prompt must start with ``prompt``, and what follows it must be
the trace so far, except that whole sibling threads may be left out (a thread's request
holds the block's outlines, not the threads before it). The reply is the rest of the trace
after that point, cut where a real server would cut it: at the first stop string, at a tag
whose id is in ``stop_token_ids``, or after ``max_tokens`` tokens (counted as words, like
the usage the server reports). Tags that are special tokens are dropped from the reply
unless the request sends ``skip_special_tokens: false``, as vLLM and SGLang do by default.

Example:
    >>> with ReplayServer(trace, prompt=prompt) as server:  # doctest: +SKIP
    ...     app = compile_apr_graph(settings=AprSettings(
    ...         base_url=server.base_url, model="test-model", native="multiverse"))
    ...     assert app.invoke({"task": task})["plan"]["reasoning"] == trace
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from apr_graph.testing.script import RecordedRequest, Reply, Rule
from apr_graph.testing.server import ScriptedServer

__all__ = ["SPECIAL_TAGS", "THREAD_TAGS", "ReplayServer", "locate"]

THREAD_TAGS = (("<Thread>", "</Thread>"), ("<Path>", "</Path>"))
"""The (opening, closing) tags of threads in ThreadWeaver's and Multiverse's formats."""

SPECIAL_TAGS = tuple(
    f"<{slash}{name}>"
    for name in ("Think", "Parallel", "Goal", "Outlines", "Outline", "Path", "Thread", "Conclusion")
    for slash in ("", "/")
)
"""Tags that are added special tokens of ThreadWeaver's or Multiverse's tokenizer."""


class ReplayServer(ScriptedServer):
    """An OpenAI-compatible loopback server whose model is one recorded trace.

    Args:
        trace: the model's whole output, as published (whitespace included).
        prompt: the raw prompt every request must start with.
        skip_special_tokens: the server's default when a request does not say; ``True``
            like vLLM and SGLang.
        special_tags: the tags that are special tokens (dropped when skipping).
        token_ids: tag -> token id, for requests that stop on ``stop_token_ids``.
        thread_tags: the (opening, closing) tags of threads, which requests may leave out.
        **kwargs: passed to ``ScriptedServer`` (``models``, ``personality``...).
    """

    def __init__(
        self,
        trace: str,
        *,
        prompt: str,
        skip_special_tokens: bool = True,
        special_tags: Iterable[str] = SPECIAL_TAGS,
        token_ids: Mapping[str, int] | None = None,
        thread_tags: Iterable[tuple[str, str]] = THREAD_TAGS,
        **kwargs: Any,
    ) -> None:
        super().__init__([Rule(reply=self.reply, where=_is_text)], **kwargs)
        self.trace = trace
        self.prompt = prompt
        self.skip_special_tokens = skip_special_tokens
        self.special_tags = tuple(special_tags)
        self.token_ids = dict(token_ids or {})
        self.spans = _thread_spans(trace, tuple(thread_tags))

    def reply(self, request: RecordedRequest) -> Reply:
        """The rest of the trace after ``request``'s prompt, cut as a server would cut it."""
        body = request.body or {}
        sent = request.prompt
        if not sent.startswith(self.prompt):
            return _refuse(f"the prompt does not start with the trace's prompt {self.prompt!r}")
        at = locate(sent[len(self.prompt) :], self.trace, self.spans)
        if isinstance(at, str):
            return _refuse(at)
        rest = self.trace[at:]
        reply: dict[str, Any] = {}
        ids = {self.token_ids[t] for t in self.token_ids} & set(body.get("stop_token_ids") or ())
        hits = [(rest.find(t), i) for t, i in self.token_ids.items() if i in ids and t in rest]
        if hits:
            cut, which = min(hits)
            rest, reply = rest[:cut], {"stop_reason": which}
        if body.get("skip_special_tokens", self.skip_special_tokens):
            for tag in self.special_tags:
                rest = rest.replace(tag, "")
        stops = body.get("stop") or []
        found = [(rest.find(s), s) for s in ([stops] if isinstance(stops, str) else stops)]
        found = [(i, s) for i, s in found if s and i >= 0]
        if found:
            cut, text = min(found)
            rest, reply = rest[:cut], {"stop_reason": text}
        words = list(re.finditer(r"\S+", rest))
        limit = body.get("max_tokens")
        if isinstance(limit, int) and len(words) > limit:
            rest = rest[: words[limit - 1].end()] if limit > 0 else ""
            return Reply(content=rest, finish_reason="length")
        return Reply(content=rest, extra=reply)


def _is_text(request: RecordedRequest) -> bool:
    return request.path.endswith("/completions") and not request.path.endswith("chat/completions")


def _refuse(message: str) -> Reply:
    return Reply(status=400, error_message=f"ReplayServer: {message}")


def _thread_spans(trace: str, tags: tuple[tuple[str, str], ...]) -> list[tuple[int, int]]:
    """(start, end) of every thread in ``trace``, its tags included, nested ones too."""
    spans = []
    for opening, closing in tags:
        stack: list[int] = []
        for found in re.finditer(re.escape(opening) + "|" + re.escape(closing), trace):
            if found.group() == opening:
                stack.append(found.start())
            elif stack:
                spans.append((stack.pop(), found.end()))
    return sorted(spans)


def _common(a: str, i: int, b: str, j: int) -> int:
    """The length of the common prefix of ``a[i:]`` and ``b[j:]`` (compared in chunks)."""
    n, k, step = min(len(a) - i, len(b) - j), 0, 1024
    while step:
        while k + step <= n and a[i + k : i + k + step] == b[j + k : j + k + step]:
            k += step
        step //= 2
    return k


def locate(generated: str, trace: str, spans: list[tuple[int, int]]) -> int | str:
    """Where in ``trace`` a request that has ``generated`` so far continues.

    ``generated`` is the trace with whole sibling threads left out. Returns the position, or
    a message saying where ``generated`` departs from the trace.
    """
    i = j = 0
    while True:
        step = _common(generated, i, trace, j)
        i, j = i + step, j + step
        if i == len(generated):
            return j
        # A sibling thread the engine left out: skip the innermost thread around j, with or
        # without the newline before it (ThreadWeaver joins threads back to back).
        inside = [(s, e) for s, e in spans if s <= j < e]
        if not inside:
            return (
                f"the request departs from the trace at character {i} of the generated text: "
                f"sent {generated[i : i + 40]!r}, the trace has {trace[j : j + 40]!r}"
            )
        start, end = max(inside)
        options = [start - 1, start] if start > 0 and trace[start - 1] == "\n" else [start]
        best = max(
            ((i - (j - s), end) for s in options if i - (j - s) >= 0),
            key=lambda pair: _common(generated, pair[0], trace, pair[1]),
            default=None,
        )
        if best is None:
            return f"the request departs from the trace at character {i}"
        i, j = best
