"""The run's input: its task and context, and the part of the context each thread is given.

A context is a string, or named documents (a mapping of name to text, e.g. the files of a
code review). The plan, the merge and a direct answer read all of it; a thread whose goal
names some of the documents reads only those (``AprSettings.thread_documents``): a thread
that reviews one of three files then reads one file, not three.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from typing import NamedTuple

from apr_graph.errors import InputError
from apr_graph.plan import is_phrase, labelled_parts
from apr_graph.prompts import quote, shared_system, worker_messages
from apr_graph.settings import AprSettings
from apr_graph.state import AprState, DecisionRecord, PlanRecord, PrefixStats, SubtaskRecord

__all__ = [
    "Pieces",
    "document_plan",
    "documents_named",
    "each_document",
    "pieces_plan",
    "planner_view",
    "prefix_stats",
    "read_input",
    "render_context",
    "split_context",
    "thread_context",
    "without_tags",
]


def read_input(state: AprState) -> tuple[str, str]:
    """The validated task and context of the graph input, the context as prompts carry it
    (``render_context``)."""
    task = state.get("task")
    if not isinstance(task, str) or not task.strip():
        raise InputError(
            f"the graph input needs a non-empty 'task' string, got {task!r}: "
            "invoke it with {'task': 'your question'}"
        )
    context = state.get("context") or ""
    if isinstance(context, Mapping):
        for name, text in context.items():
            if not isinstance(name, str) or not name.strip() or not isinstance(text, str):
                raise InputError(
                    "'context' as documents maps each non-empty name to its text, got "
                    f"{name!r}: {type(text).__name__}"
                )
    elif not isinstance(context, str):
        raise InputError(
            "'context' must be a string or a mapping of document names to texts, got "
            f"{type(context).__name__}"
        )
    return task.strip(), render_context(context)


def _text(text: str) -> str:
    # A document's text must not close our tags early; the prompts quote the rest.
    return quote(text).replace("</document>", "<\\/document>")


def _document(name: str, text: str, size: str = "") -> str:
    name = _text(name).replace('"', "&quot;")
    return f'<document name="{name}"{size}>\n{_text(text)}\n</document>'


def render_context(context: str | Mapping[str, str]) -> str:
    """The context as the prompts carry it: a string as it is; named documents (a mapping of
    name to text, e.g. files) one after the other, each inside a ``<document name="...">``
    tag, so a model can tell them apart and cite them by name."""
    if isinstance(context, str):
        return context
    return "\n".join(_document(name, text) for name, text in context.items())


_OUR_TAG = re.compile(r'\s*(?:<document name="([^"]*)"[^>]*>|</document>|</?context>)\s*')


def without_tags(answer: str, context: str | Mapping[str, str] | None) -> str:
    """``answer`` without the lines of the tags the prompts wrapped ``context`` in, when a
    model copied them with the text it wrote out again (a 1.5B model's "corrected code" of
    two files came inside ``<context>`` and ``<document name=...>`` lines). Only an answer
    that opens a document given, or the ``<context>`` tag, by its own line is changed."""
    if not context:
        return answer
    names = {"text"} if isinstance(context, str) else set(context)
    names = {_text(name).replace('"', "&quot;") for name in names}
    lines = answer.splitlines(keepends=True)
    tags = [_OUR_TAG.fullmatch(line) for line in lines]
    ours = [t is not None and (t.group(1) is None or t.group(1) in names) for t in tags]
    opened = any(o and "</" not in line for o, line in zip(ours, lines, strict=True))
    if not opened:
        return answer
    return "".join(line for line, mine in zip(lines, ours, strict=True) if not mine)


def documents_named(documents: Mapping[str, str], goal: str) -> list[str]:
    """The names of the ``documents`` that ``goal`` names, in the documents' order: a name
    counts when it appears as a whole word, in any case, either whole or as its last path
    part (``src/calc.py`` is named by "calc.py" when no other document ends so)."""
    return list(_named(tuple(documents), goal))


@functools.lru_cache(maxsize=256)
def _named(names: tuple[str, ...], goal: str) -> tuple[str, ...]:
    # Cached: the decision, the early start, the prefix figure and the worker all ask.
    tails = {name: re.split(r"[\\/]", name)[-1].lower() for name in names}
    shared = {tail for tail in tails.values() if list(tails.values()).count(tail) > 1}
    text = goal.lower()
    return tuple(
        name
        for name, tail in tails.items()
        if any(
            re.search(rf"(?<![\w./\\-]){re.escape(form)}(?![\w/\\-]|\.\w)", text)
            for form in {name.lower(), *({tail} - shared)}
            if form
        )
    )


def thread_context(
    context: str | Mapping[str, str] | None, goal: str, documents: str = "named"
) -> tuple[str, list[str] | None]:
    """The context one thread is given, rendered, and the names of its documents when that
    is a part of them: with ``documents="named"``, a goal that names some but not all of the
    context's documents gets those only (``documents_named``); otherwise the whole context.
    A context of one string is always given whole."""
    if isinstance(context, str) or not context:
        return render_context(context or ""), None
    if documents == "named":
        names = documents_named(context, goal)
        if names and len(names) < len(context):
            return render_context({name: context[name] for name in names}), names
    return render_context(context), None


_ACROSS = re.compile(
    r"\b(?:compar\w*|contrast\w*|differ\w*|versus|vs|between|which|rank\w*|relat\w*|"
    r"consistent\w*|together|combin\w*|overall|across|both|merg\w*|same)\b",
    re.I,
)
"""Words of a task that asks for something across its parts (a comparison, a ranking, one
combined answer): the model plans it, and may choose a merge that reads every part."""

_EACH = re.compile(
    r"\b(?:each|every)\s+(?:one\s+)?(?:of\s+(?:these|those|the|my)\s+)?"
    r"(?:files?|documents?|docs?|modules?|scripts?|pages?|chapters?|logs?|texts?)\b",
    re.I,
)
"""A task that asks the same of each of its documents ("For each file, list ...")."""

_TAIL = re.compile(r"(?:[\s,;.]|\b(?:and|or)\b)+$", re.I)
"""What joins a part to the next ("(a) calc.py, (b) io.py and (c) ..."), not a part of it."""


def each_document(task: str, context: str | Mapping[str, str] | None) -> list[str] | None:
    """The names of the context's documents when the task asks something of each of them
    ("For each file, ...", "Review every document ..."), each name naming its document alone;
    else ``None``."""
    if not isinstance(context, Mapping) or len(context) < 2 or not _EACH.search(task):
        return None
    if any(documents_named(context, name) != [name] for name in context):
        return None
    return list(context)


def document_plan(
    task: str,
    context: str | Mapping[str, str] | None,
    settings: AprSettings,
    *,
    slots: int,
    tools: bool = False,
) -> list[SubtaskRecord] | None:
    """The subtasks of a task that maps over its documents, or ``None``.

    When the task labels its parts ("Review (a) calc.py (b) io.py"), each part is a phrase
    naming exactly one document, every document is named by one part, and the task asks for
    nothing across them, the plan is known without a planning call: one thread per part,
    reading its own document (``AprSettings.plan_documents``). So it is when the task asks
    the same of each document ("For each file, list ...") and nothing across them: one
    thread per document, its goal the document's name. Not with tools, nor with a ``merge``
    of attempts at one question, nor with fewer free thread ``slots`` than documents.
    """
    if (
        not settings.plan_documents
        or settings.thread_documents != "named"
        or settings.merge not in {None, "concat", "synthesize"}
        or tools
        or not isinstance(context, Mapping)
        or len(context) < 2
        or _ACROSS.search(task)
    ):
        return None
    max_threads = min(settings.max_threads, slots)
    if len(context) > max_threads:
        return None
    parts = {label: _TAIL.sub("", text) for label, text in labelled_parts(task).items()}
    if not parts and (names := each_document(task, context)) is not None:
        return [_mapped(index, name) for index, name in enumerate(names, start=1)]
    if len(parts) != len(context):
        return None
    named = [documents_named(context, text) for text in parts.values()]
    if any(len(names) != 1 for names in named) or len({n[0] for n in named}) != len(context):
        return None
    if not all(text and is_phrase(text) for text in parts.values()):
        return None
    return [
        _mapped(index, f"({label}) {text}")
        for index, (label, text) in enumerate(parts.items(), start=1)
    ]


def _mapped(index: int, goal: str) -> SubtaskRecord:
    return SubtaskRecord(id=f"s{index}", goal=goal, depends_on=[], fork=False, max_tokens=None)


class Pieces(NamedTuple):
    """A context cut for threads (``split_context``)."""

    documents: dict[str, str]
    """The pieces by name, in order: the context the threads read."""
    subtasks: list[SubtaskRecord]
    """One per group of pieces, naming them."""
    tokens: int
    """The whole context's size in tokens, as estimated (or as the server counted it)."""


_CHARS_PER_TOKEN = 3  # code and dense text: pieces sized by it fit where 4 would not
_FEWEST_TOKENS = 5  # characters a token at most: a context longer than this allows is too long
_REPLY_SHARE = 4  # one request's context kept for its reply: a quarter
_OVERHEAD_TOKENS = 350  # a thread's instructions, goal and document tags
_TAG_CHARS = 30  # a document's <document name="..."> tag, beyond its name


def split_context(
    task: str,
    context: str | Mapping[str, str] | None,
    settings: AprSettings,
    *,
    slot_context: int | None,
    slots: int,
    refused: int | None = None,
) -> Pieces | None:
    """The context cut into pieces that each fit one request, and one subtask per group of
    pieces, when the task and its whole context cannot fit one request of a server whose
    per-request context is ``slot_context`` tokens (even at ``_FEWEST_TOKENS``, with an
    eighth of it for the reply), or the server refused them (``refused``: the tokens it
    counted, or 0 if it did not say); else ``None``. Pieces keep a quarter for the reply,
    at 3 characters a token, or fewer where the server's count says the text is denser.
    Documents are cut at line ends into parts named "NAME (part K of N)" (a string context is
    the document "text"); small neighbours share a thread.

    Raises:
        InputError: more threads would be needed than the run's free thread ``slots``
            (``max_total_threads``) allow, or the task alone leaves no room.
    """
    if not slot_context or not context or settings.thread_documents != "named":
        return None
    # Its size as the prompts carry it, without rendering it again (a long context's pass).
    documents = {"text": context} if isinstance(context, str) else dict(context)
    rendered = sum(len(text) + len(name) + _TAG_CHARS for name, text in documents.items())
    least = (rendered + len(task)) // _FEWEST_TOKENS + _OVERHEAD_TOKENS + slot_context // 8
    if refused is None and least <= slot_context:
        return None
    per_token = min(_CHARS_PER_TOKEN, rendered / refused) if refused else _CHARS_PER_TOKEN
    room = slot_context - slot_context // _REPLY_SHARE - _OVERHEAD_TOKENS
    room -= int(len(task) / per_token)
    whole = int(rendered / per_token)
    fix = (
        "give the server a larger context (llama.cpp: -c N with fewer -np slots), shorten "
        "the context"
    )
    if room < 100:
        raise InputError(f"the task leaves no room for its context in one request: {fix}")
    chars = int(room * per_token)
    pieces: dict[str, str] = {}
    for name, text in documents.items():
        cut = _cut(text, chars)
        for index, part in enumerate(cut, start=1):
            pieces[f"{name} (part {index} of {len(cut)})" if len(cut) > 1 else name] = part
    groups: list[list[str]] = []
    size = chars  # a first piece opens a group
    for name, text in pieces.items():
        size += len(text) + len(name) + _TAG_CHARS
        if size > chars:
            groups.append([])
            size = len(text) + len(name) + _TAG_CHARS
        groups[-1].append(name)
    if len(groups) > slots:  # not max_threads: a plan's cap, and the pieces are no plan
        raise InputError(
            f"the context is ~{whole:,} tokens and one request on this server holds "
            f"{slot_context:,}: read in pieces, it needs {len(groups)} threads, and "
            f"max_total_threads allows {slots}: raise it, or {fix}"
        )
    goals = [
        f"Do the task for {', '.join(names)} alone (other threads read the rest)"
        for names in groups
    ]
    subtasks = [
        SubtaskRecord(id=f"s{i}", goal=goal, depends_on=[], fork=False, max_tokens=None)
        for i, goal in enumerate(goals, start=1)
    ]
    return Pieces(pieces, subtasks, whole)


def pieces_plan(pieces: Pieces, merge: str, slot_context: int | None) -> PlanRecord:
    """The plan of ``split_context``'s pieces of a context too long for one request: a
    thread per group of pieces, merged by ``merge`` from their results alone."""
    reason = (
        f"the context (~{pieces.tokens:,} tokens) does not fit one request on this server "
        f"({slot_context or 0:,} per request): read in {len(pieces.subtasks)} pieces"
    )
    plan = PlanRecord(
        strategy="parallel", answer=None, subtasks=pieces.subtasks, merge=merge, notes=[reason]
    )
    plan["pieces"] = len(pieces.subtasks)
    plan["decision"] = DecisionRecord(
        choice="parallel", by="length", reason=reason, shape=None, threshold=None
    )
    return plan


def _cut(text: str, chars: int) -> list[str]:
    """``text`` in parts of at most ``chars`` characters, cut at line ends where it can."""
    parts: list[str] = []
    for line in text.splitlines(keepends=True):
        while len(line) > chars:  # a line longer than a part: cut inside it
            parts.append(line[:chars])
            line = line[chars:]
        if parts and len(parts[-1]) + len(line) <= chars:
            parts[-1] += line
        else:
            parts.append(line)
    return parts or [text]


def planner_view(context: str | Mapping[str, str], chars: int | None) -> tuple[str, bool]:
    """The context as the planner reads it, and whether that is only a part of it.

    Named documents longer than ``chars`` are shown by their beginning (cut at a line end),
    with their full size: the planner decides and splits by what the documents are, and
    reading all of them would put their whole prefill before the first thread starts (a
    string context, or ``chars=None``, is read whole).
    """
    if isinstance(context, str) or chars is None or all(len(t) <= chars for t in context.values()):
        return render_context(context), False
    parts = []
    for name, text in context.items():
        head = text if len(text) <= chars else text[:chars].rsplit("\n", 1)[0] + "\n[...]"
        size = f' lines="{len(text.splitlines())}" chars="{len(text)}"'
        parts.append(_document(name, head, size))
    return "\n".join(parts), True


def prefix_stats(
    task: str,
    context: str,
    plan: PlanRecord,
    system: str,
    given: str | Mapping[str, str] = "",
    documents: str = "all",
    *,
    tools: bool = False,
) -> PrefixStats:
    """How much of the fan-out's whole prompts is one shared prefix, byte for byte.

    Threads share ``system``, unless given documents of their own (``given``, ``documents``:
    see ``thread_context``; ``tools``: the threads have tools).
    """
    merge = plan["merge"]

    def prompt(subtask: SubtaskRecord) -> bytes:
        text, names = thread_context(given, subtask["goal"], documents)
        own = system if names is None else shared_system(task, text, tools=tools, merge=merge)
        messages = worker_messages(task, context, merge, subtask, system=own)
        return json.dumps(messages, ensure_ascii=False).encode()

    prompts = [prompt(subtask) for subtask in plan["subtasks"]]
    shared = len(os.path.commonprefix(prompts))  # noqa: RUF071 - a byte-level prefix is the point
    shortest = min(len(p) for p in prompts)
    return PrefixStats(
        shared_chars=shared,
        shortest_prompt_chars=shortest,
        shared_fraction=round(shared / shortest, 4) if shortest else 0.0,
    )
