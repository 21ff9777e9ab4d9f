"""A direct answer: the whole task in one call, when the decision is not to fork."""

from __future__ import annotations

from apr_graph.board import RunBoard
from apr_graph.budget import StoppedError
from apr_graph.errors import BudgetExhaustedError, ModelCallError
from apr_graph.events import answer_emitter
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.plan import labelled_parts
from apr_graph.prompts import direct_messages
from apr_graph.responses import StreamProgress
from apr_graph.settings import AprSettings
from apr_graph.state import CallRecord, PlanRecord

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
) -> str:
    """The plan's own answer, else one call that answers the task whole (streamed as
    ``answer_token`` events, its record appended to ``calls``)."""
    answer = plan["answer"] or ""
    if not answer:
        try:
            direct = await board.guard(
                client.chat(
                    direct_messages(task, context, settings.direct_instructions),
                    role="planner",
                    max_tokens=direct_allowance(task, settings),
                    budget=board.budget,
                    progress=StreamProgress(on_text=answer_emitter()),
                )
            )
        except (StoppedError, BudgetExhaustedError) as stop:
            reason = board.budget.stop_reason or getattr(stop, "reason", "budget")
            return f"(incomplete: the {reason} was reached before an answer)"
        calls.append(call_record(direct, role="planner"))
        answer = direct.text
    if not answer.strip():
        raise ModelCallError(
            f"the model at {client.base_url} returned an empty answer", url=client.base_url
        )
    return answer
