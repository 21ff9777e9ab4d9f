"""The synthesize node: merges the thread results, in plan order, into the answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from apr_graph.errors import ModelCallError
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import call_record
from apr_graph.prompts import synthesizer_messages
from apr_graph.state import AprState, ThreadRecord

__all__ = ["make_synthesize", "threads_in_plan_order"]


def threads_in_plan_order(state: AprState) -> list[ThreadRecord]:
    """The thread records sorted as the plan lists their subtasks."""
    order = {s["id"]: i for i, s in enumerate((state.get("plan") or {}).get("subtasks", []))}
    return sorted(state.get("threads") or [], key=lambda t: order.get(t["id"], len(order)))


def make_synthesize(client: LLMClient) -> Callable[[AprState], Awaitable[dict[str, Any]]]:
    """Build the synthesize node."""

    async def synthesize(state: AprState) -> dict[str, Any]:
        threads = threads_in_plan_order(state)
        done = [t for t in threads if t["status"] == "done" and (t["answer"] or "").strip()]
        if not done:
            reasons = "; ".join(f"{t['id']}: {t['error'] or 'empty answer'}" for t in threads)
            raise ModelCallError(
                f"all {len(threads)} threads failed, nothing to merge ({reasons})",
                url=client.base_url,
            )
        results = [
            (
                t["id"],
                t["goal"],
                t["answer"]
                if t["status"] == "done" and t["answer"]
                else f"(this thread failed: {t['error'] or 'empty answer'})",
            )
            for t in threads
        ]
        messages = synthesizer_messages(
            state.get("task", ""), state.get("context", "") or "", state.get("plan") or {}, results
        )
        completion = await client.chat(messages, role="synthesizer")
        answer = completion.text.strip()
        if not answer:
            # An empty merge must not erase finished work: fall back to the results themselves.
            answer = "\n\n".join(f"{t['goal']}\n{t['answer']}" for t in done)
        return {"answer": answer, "calls": [call_record(completion, role="synthesizer")]}

    return synthesize
