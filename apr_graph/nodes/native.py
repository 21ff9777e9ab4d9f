"""The native node: for models trained to write their own parallel blocks.

The model's text streams through the completions API and stops where a block's outlines end
(ThreadWeaver's ``<Outlines>``, Multiverse's ``<Goal>``); one request per numbered outline is
forked (prompt = everything so far + the thread's header, stopping at its closing tag), the
threads are joined as the model's own engine does (``apr_graph.native``), and the model goes
on. Threads may nest up to ``max_depth``; past it, or past ``max_total_threads``, the model
writes a block's threads itself, one after another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from langgraph.types import Overwrite

from apr_graph.board import Boards, RunBoard
from apr_graph.budget import StoppedError
from apr_graph.errors import BudgetExhaustedError
from apr_graph.events import emit
from apr_graph.inputs import read_input
from apr_graph.llm import LLMClient
from apr_graph.native import FORMATS, NativeFormat, NativeProtocolError, Outline, final_answer
from apr_graph.nodes._records import call_record
from apr_graph.nodes.thread import emit_finished
from apr_graph.responses import LOOPED
from apr_graph.settings import AprSettings
from apr_graph.state import AprState, CallRecord, NativeBlock, PlanRecord, ThreadRecord

__all__ = ["FORMATS", "NativeFormat", "make_native"]


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


@dataclass
class _Chain:
    """The text one chain generated, its critical-path tokens, why it was cut (``None``: it
    was not), and whether its closing tag (``end``) ended it."""

    text: str
    critical: int
    cut: str | None
    closed: bool = False


async def _generate(
    run: _Run, prefix: str, *, depth: int, end: str | None, owner: str | None
) -> _Chain:
    """Generate from ``prefix`` until EOS (or ``end``), forking at every outlines block; the
    critical path is the chain's own tokens plus, per block, its longest thread's."""
    fmt, settings = run.fmt, run.settings
    out, critical, left = "", 0, settings.native_max_tokens
    stops = ([fmt.outlines_close] if depth < settings.max_depth else []) + ([end] if end else [])
    body: dict[str, Any] = {  # the server options of every request (``native_*``)
        "skip_special_tokens": settings.native_skip_special_tokens,
        # vLLM and SGLang put spaces between adjacent special tokens unless told not to.
        "spaces_between_special_tokens": False,
    }
    ids = settings.native_stop_token_ids
    if stop_ids := [ids[s] for s in stops if s in ids]:
        body["stop_token_ids"] = stop_ids
    while True:
        completion = await run.board.guard(
            run.client.complete(
                prefix + out,
                role="native",
                stop=stops,
                max_tokens=left,
                budget=run.board.budget,
                extra_body=body,
            )
        )
        run.calls.append(call_record(completion, role="native", thread_id=owner))
        out += completion.text
        critical += completion.completion_tokens
        left -= completion.completion_tokens
        if completion.finish_reason == LOOPED:  # what came before the loop is kept
            return _Chain(out, critical, cut="cut where it began repeating itself")
        if completion.finish_reason == "length":
            if left > 0 and completion.text:  # the server allowed less than asked: go on
                continue
            cut = f"cut at native_max_tokens={settings.native_max_tokens}"
            return _Chain(out, critical, cut=cut)
        hit = _stopped_at(completion.stop_reason, out, fmt, stops)
        if hit == fmt.outlines_close:
            out += hit
            outlines = fmt.outlines(out)
            if outlines:  # a block without numbered outlines goes on sequentially
                joined, longest = await _fork(run, prefix + out, outlines, depth=depth, owner=owner)
                out += joined
                critical += longest
            continue
        # The closing tag of a thread in a block the model writes itself, not ours; unless
        # nothing new came (asking again would get nothing again).
        new = completion.text or not out
        if hit is not None and hit == end and new and fmt.open_blocks(out) > 0:
            out += hit
            continue
        return _Chain(out, critical, cut=None, closed=hit is not None and hit == end)


def _stopped_at(reason: object, out: str, fmt: NativeFormat, stops: list[str]) -> str | None:
    """Which stop string ended a request (``None``: the model's end of sequence). When the
    server does not say (a stop token id is no string), it is read from the text: inside an
    outlines block, their end; in a thread, the thread's end (far likelier than EOS there)."""
    if isinstance(reason, str) and reason in stops:
        return reason
    if fmt.outlines_close in stops and fmt.in_outlines(out):
        return fmt.outlines_close
    if fmt.thread_close in stops:
        return fmt.thread_close
    return None


async def _fork(
    run: _Run, prefix: str, outlines: list[Outline], *, depth: int, owner: str | None
) -> tuple[str, int]:
    """Run one thread per outline of the block that just closed; return their joined text."""
    granted = run.board.budget.reserve_threads(min(len(outlines), run.settings.max_threads))
    block_id = f"{owner + '/' if owner else ''}b{len(run.blocks) + 1}"
    goals = [o.goal for o in outlines]
    run.blocks.append(NativeBlock(id=block_id, depth=depth + 1, outlines=goals, forked=granted))
    emit(
        "plan",
        strategy="native",
        subtasks=[{"id": f"{block_id}.{o.label}", "goal": o.goal} for o in outlines],
        notes=[],
        merge="concatenate",
        depth=depth + 1,
    )
    if granted < len(outlines):
        # Not enough thread slots for this block: the model writes its threads itself.
        return "", 0
    results = await asyncio.gather(
        *(_thread(run, prefix, o, block_id, depth=depth + 1, owner=owner) for o in outlines)
    )
    joined = run.fmt.join([(o.label, body) for o, (body, _) in zip(outlines, results, strict=True)])
    return joined, max(critical for _, critical in results)


async def _thread(
    run: _Run, prefix: str, outline: Outline, block_id: str, *, depth: int, owner: str | None
) -> tuple[str, int]:
    """One thread of a block: its body (closing tag excluded) and critical-path tokens."""
    fmt = run.fmt
    sid = f"{block_id}.{outline.label}"
    started = time.time()
    emit("thread_started", id=sid, goal=outline.goal, at=started, depth=depth)
    chain = await _generate(
        run, prefix + fmt.header(outline.label), depth=depth, end=fmt.thread_close, owner=sid
    )
    # A cut thread is closed the way ThreadWeaver's engine closes it ("\n</Thread>").
    body = chain.text if chain.closed else chain.text + "\n"
    mine = [c for c in run.calls if c["thread_id"] == sid]
    record = ThreadRecord(
        id=sid,
        goal=outline.goal,
        status="cancelled" if chain.cut else "done",
        answer=body.strip(),
        error=chain.cut,
        prompt_tokens=sum(c["prompt_tokens"] for c in mine),
        completion_tokens=sum(c["completion_tokens"] for c in mine),
        critical_path_tokens=chain.critical,
        started_at=started,
        ended_at=time.time(),
        depth=depth,
        parent=owner,
        attempts=1,
        verified=None,
    )
    run.threads.append(record)
    emit_finished(record)
    return body, chain.critical


def _check_tags(settings: AprSettings, fmt: NativeFormat, text: str) -> None:
    required = settings.native_require_tags
    if required is None:
        required = fmt.name == "multiverse"
    if required and text and not any(tag in text for tag in fmt.special_tags):
        raise NativeProtocolError(
            f"the {fmt.name} model's text has none of its tags ({', '.join(fmt.special_tags)}): "
            "the server drops special tokens (vLLM and SGLang do unless the request says "
            "skip_special_tokens=false; keep AprSettings(native_skip_special_tokens=False) and "
            "check that a proxy forwards it), or the model is not a trained "
            f"{fmt.name} model (then drop native=, or set native_require_tags=False)"
        )


def make_native(
    client: LLMClient, boards: Boards, *, native: str
) -> Callable[[AprState, AprSettings], Awaitable[dict[str, Any]]]:
    """Build the native node of the format ``native`` (``AprSettings.native``), given each
    run's settings."""
    fmt = FORMATS[native]

    async def native_run(state: AprState, settings: AprSettings) -> dict[str, Any]:
        task, context = read_input(state)
        started = time.time()
        board = boards.open(settings, state.get("parent_run"), "concatenate")
        run = _Run(client.for_run(settings), settings, board, fmt)
        # No stray newline before <|im_end|> when there is no context: the model never saw one.
        prompt = (settings.native_prompt or fmt.prompt).format(
            task=task, context=f"\n\n{context}" if context.strip() else ""
        )
        try:
            chain = await _generate(run, prompt, depth=0, end=None, owner=None)
            _check_tags(settings, fmt, chain.text)
            text, critical = chain.text, chain.critical
            answer = final_answer(text, fmt.block_close)
            if chain.cut and "</think>" not in text.lower():
                answer = (
                    f"(incomplete: the reasoning reached native_max_tokens="
                    f"{settings.native_max_tokens} before its answer)"
                )
        except (StoppedError, BudgetExhaustedError):
            reason = board.budget.stop_reason or "budget"
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
            # A run starts its records afresh: a LangGraph thread may hold an earlier run's.
            "threads": Overwrite(run.threads),
            "calls": Overwrite(run.calls),
        }

    return native_run
