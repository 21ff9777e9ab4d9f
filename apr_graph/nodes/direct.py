"""A direct answer: the whole task in one call, when the decision is not to fork."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from apr_graph.answers import without_empty_final
from apr_graph.board import RunBoard
from apr_graph.budget import StoppedError
from apr_graph.errors import BudgetExhaustedError, ModelCallError
from apr_graph.events import answer_emitter, emit
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record, stopped_record
from apr_graph.nodes.thread import REPEATED, fresh_attempt, retry_temperature
from apr_graph.nodes.tool_loop import tool_loop
from apr_graph.plan import labelled_parts
from apr_graph.prompts import direct_messages
from apr_graph.responses import LOOPED, StreamProgress, estimate_tokens, strip_reasoning
from apr_graph.settings import AprSettings
from apr_graph.state import CallRecord, PlanRecord

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

__all__ = ["direct_allowance", "direct_answer"]


def direct_allowance(task: str, settings: AprSettings) -> int:
    """Output tokens of a direct answer, which holds every part of the task: a thread's
    allowance per labelled part (at least two), and never less than the planner's."""
    parts = max(2, len(labelled_parts(task)))
    return max(settings.planner_max_tokens, settings.worker_max_tokens * parts)


async def direct_answer(
    client: LLMClient,
    settings: AprSettings,
    board: RunBoard,
    plan: PlanRecord,
    task: str,
    context: str,
    calls: list[CallRecord],
    *,
    tools: Sequence[BaseTool] = (),
) -> str:
    """The plan's own answer, else one call that answers the task whole (streamed as
    ``answer_token`` events, its record appended to ``calls``), and one fresh call if that
    one began repeating itself early (``fresh_attempt``; an ``answer_retry`` event). With
    ``tools`` the call may use them, as a thread does (``tool_loop``); its text is then not
    streamed, since a round may be a call written as text."""
    answer = plan["answer"] or ""
    rejected = None
    while not answer:
        messages = direct_messages(task, context, settings.direct_instructions, rejected=rejected)
        allowance = direct_allowance(task, settings)
        progress = StreamProgress(on_text=answer_emitter())
        if tools:
            work = tool_loop(
                client, settings, board.budget, "direct", messages, tools, allowance, role="planner"
            )
        else:
            work = client.chat(
                messages,
                role="planner",
                thread="direct",
                max_tokens=allowance,
                budget=board.budget,
                progress=progress,
                temperature=retry_temperature(settings) if rejected else None,
            )
        try:
            direct = await board.guard(work)
        except (StoppedError, BudgetExhaustedError) as stop:
            reason = board.budget.stop_reason or getattr(stop, "reason", "budget")
            record = stopped_record(
                progress,
                messages,
                role="planner",
                model=settings.model_for("planner"),
                mode="stopped",
                charge=board.budget.charge,
            )
            if record is not None:  # its cost counts, as a thread's does
                calls.append(record)
            so_far = "" if tools else strip_reasoning(progress.text)  # shown as it streamed
            if so_far:
                return f"(incomplete: the {reason} was reached; the answer is cut off)\n\n{so_far}"
            return f"(incomplete: the {reason} was reached before an answer)"
        calls.append(call_record(direct, role="planner"))
        if direct.unrun_tool_call is not None:
            raise ModelCallError(
                f"the model at {client.base_url} did not answer: its reply was "
                f"{direct.unrun_tool_call}",
                url=client.base_url,
            )
        answer = without_empty_final(direct.text)
        kept = estimate_tokens(answer)
        if (
            direct.finish_reason == LOOPED
            and rejected is None
            and fresh_attempt(settings, board.budget, kept, allowance)
        ):
            # It began repeating itself before it said much (a list that runs away with
            # its first item): asked once more, told so, as a thread would be.
            rejected = REPEATED.format(kept=kept)
            emit("answer_retry", reason=rejected, at_tokens=kept)
            answer = ""
            continue
        break
    if not answer.strip():
        raise ModelCallError(
            f"the model at {client.base_url} returned an empty answer", url=client.base_url
        )
    return answer
