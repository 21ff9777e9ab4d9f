"""The native node: for models trained to write their own parallel blocks.

ThreadWeaver-style models write ``<Parallel><Outlines><Outline>1: ...</Outline>...</Outlines>``
then one ``<Thread>`` per outline; Multiverse-style models write ``<Parallel><Goal><Outline>...
</Goal>`` then ``<Path>`` blocks and a ``<Conclusion>``. apr-graph streams the model's text
through the completions API and stops it where the outlines end; it then forks one request
per outline (prompt = everything so far + the thread's opening tag, stopping at its closing
tag), joins the threads by concatenation, and lets the model continue. A thread may open a
block of its own (nested), up to ``max_depth``; past it, or past ``max_total_threads``, the model
writes its threads itself, one after another. Budgets, cancellation, events and metrics are
the same as in the prompted mode.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from apr_graph.board import Boards, RunBoard
from apr_graph.budget import StoppedError
from apr_graph.errors import BudgetExhaustedError
from apr_graph.events import emit
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.nodes.decompose import read_input
from apr_graph.responses import Completion
from apr_graph.settings import AprSettings
from apr_graph.state import AprState, CallRecord, NativeBlock, PlanRecord, ThreadRecord

__all__ = ["FORMATS", "NativeFormat", "make_native"]


@dataclass(frozen=True)
class NativeFormat:
    """The tags of one family of native parallel reasoners."""

    name: str
    outlines_open: str
    outlines_close: str
    thread_open: str
    thread_close: str
    block_close: str = "</Parallel>"
    outline: re.Pattern[str] = re.compile(r"<Outline>\s*(.*?)\s*</Outline>", re.S)


FORMATS = {
    "threadweaver": NativeFormat(
        "threadweaver", "<Outlines>", "</Outlines>", "<Thread>", "</Thread>"
    ),
    "multiverse": NativeFormat("multiverse", "<Goal>", "</Goal>", "<Path>", "</Path>"),
}


@dataclass
class _Run:
    """What one native run accumulates."""

    client: LLMClient
    settings: AprSettings
    board: RunBoard
    fmt: NativeFormat
    calls: list[CallRecord] = field(default_factory=list)
    threads: list[ThreadRecord] = field(default_factory=list)
    blocks: list[NativeBlock] = field(default_factory=list)
    counter: int = 0


def _label(outline: str, index: int) -> str:
    found = re.match(r"\s*(\d+(?:\.\d+)*)\s*[:.]", outline)
    return found.group(1) if found else str(index + 1)


def _open_block(text: str, fmt: NativeFormat) -> bool:
    """Whether the text ends inside an outlines block (so the outlines' end stopped it)."""
    return text.rfind(fmt.outlines_open) > text.rfind(fmt.outlines_close)


async def _generate(
    run: _Run, prefix: str, *, depth: int, end: str | None, owner: str | None
) -> tuple[str, int]:
    """Generate from ``prefix`` until EOS (or ``end``), forking at every outlines block.

    Returns the text and its critical-path tokens (this chain plus, per block, the longest
    of its threads).
    """
    fmt, settings = run.fmt, run.settings
    out, critical = "", 0
    while True:
        may_fork = depth < settings.max_depth
        stops = ([fmt.outlines_close] if may_fork else []) + ([end] if end else [])
        completion: Completion = await run.board.guard(
            run.client.complete(
                prefix + out,
                role="native",
                stop=stops,
                max_tokens=settings.worker_max_tokens,
                budget=run.board.budget,
            )
        )
        run.calls.append(call_record(completion, role="native", thread_id=owner))
        out += completion.text
        critical += completion.completion_tokens
        hit = completion.stop_reason
        forked = completion.finish_reason == "stop" and (
            hit == fmt.outlines_close or (hit is None and _open_block(out, fmt))
        )
        if not forked or not may_fork:
            return out, critical
        out += fmt.outlines_close
        joined, longest = await _fork(run, prefix + out, out, depth=depth, owner=owner)
        out += joined
        critical += longest


async def _fork(
    run: _Run, prefix: str, text: str, *, depth: int, owner: str | None
) -> tuple[str, int]:
    """Run one thread per outline of the block that just closed; return their joined text."""
    fmt = run.fmt
    block = text[text.rfind(fmt.outlines_open) :]
    outlines = fmt.outline.findall(block)
    granted = run.board.budget.reserve_threads(min(len(outlines), run.settings.max_threads))
    block_id = f"{owner + '/' if owner else ''}b{len(run.blocks) + 1}"
    run.blocks.append(NativeBlock(id=block_id, depth=depth + 1, outlines=outlines, forked=granted))
    emit(
        "plan",
        strategy="native",
        subtasks=[{"id": f"{block_id}.{_label(o, i)}", "goal": o} for i, o in enumerate(outlines)],
        notes=[],
        merge="concatenate",
        depth=depth + 1,
    )
    if granted < len(outlines):
        # Not enough thread slots for this block: the model writes its threads itself.
        return "\n", 0

    async def thread(index: int, outline: str) -> tuple[str, int]:
        label = _label(outline, index)
        sid = f"{block_id}.{label}"
        opening = f"\n{fmt.thread_open}\n{label}:"
        started = time.time()
        emit("thread_started", id=sid, goal=outline, at=started, depth=depth + 1)
        body, critical = await _generate(
            run, prefix + opening, depth=depth + 1, end=fmt.thread_close, owner=sid
        )
        tokens = sum(c["completion_tokens"] for c in run.calls if c["thread_id"] == sid)
        record = ThreadRecord(
            id=sid,
            goal=outline,
            status="done",
            answer=body.strip(),
            error=None,
            prompt_tokens=sum(c["prompt_tokens"] for c in run.calls if c["thread_id"] == sid),
            completion_tokens=tokens,
            critical_path_tokens=critical,
            started_at=started,
            ended_at=time.time(),
            depth=depth + 1,
            parent=owner,
            attempts=1,
            verified=None,
        )
        run.threads.append(record)
        emit(
            "thread_finished",
            id=sid,
            status="done",
            completion_tokens=tokens,
            elapsed_s=round(record["ended_at"] - started, 3),
            error=None,
            answer=record["answer"],
            depth=depth + 1,
        )
        return f"{opening}{body}{fmt.thread_close}", critical

    results = await asyncio.gather(*(thread(i, o) for i, o in enumerate(outlines)))
    return "".join(text for text, _ in results) + "\n", max(c for _, c in results)


def _answer(text: str, fmt: NativeFormat) -> str:
    tail = (
        text[text.rfind(fmt.block_close) + len(fmt.block_close) :]
        if fmt.block_close in text
        else text
    )
    return tail.strip() or text.strip()


def make_native(
    client: LLMClient, settings: AprSettings, boards: Boards
) -> Callable[[AprState], Awaitable[dict[str, Any]]]:
    """Build the native node (``AprSettings(native=...)``)."""
    if settings.native is None:
        raise ValueError("make_native needs AprSettings(native='threadweaver' or 'multiverse')")
    fmt = FORMATS[settings.native]

    async def native(state: AprState) -> dict[str, Any]:
        task, context = read_input(state)
        started = time.time()
        budget = boards.budget_for(settings, state.get("parent_run"))
        board = RunBoard(uuid.uuid4().hex, budget, "concatenate", [])
        boards.attach(board)
        run = _Run(client, settings, board, fmt)
        prompt = settings.native_prompt.format(task=task, context=context)
        try:
            text, critical = await _generate(run, prompt, depth=0, end=None, owner=None)
            answer = _answer(text, fmt)
        except (StoppedError, BudgetExhaustedError):
            reason = budget.stop_reason or "budget"
            text, critical = "", 0
            answer = f"(incomplete: the {reason} was reached while the model was reasoning)"
        except BaseException:  # failed or cancelled: the run is over, its board goes too
            boards.close(board.run_id, root=not state.get("parent_run"))
            raise
        plan = PlanRecord(
            strategy="native",
            answer=None,
            subtasks=[],
            merge="concatenate",
            notes=[],
            format=fmt.name,
            blocks=run.blocks,
            reasoning=text,
            critical_path_tokens=critical,
        )
        return {
            "started_at": started,
            "run_id": board.run_id,
            "plan": plan,
            "answer": answer,
            "threads": run.threads,
            "calls": run.calls,
        }

    return native
