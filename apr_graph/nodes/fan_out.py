"""The fan-out edge: one ``Send`` per subtask, created at run time from the plan."""

from __future__ import annotations

from collections.abc import Callable

from langgraph.types import Send

from apr_graph.plan import plan_of
from apr_graph.state import AprState, WorkerInput

__all__ = ["make_fan_out"]


def make_fan_out(worker: str, skip: str) -> Callable[[AprState], list[Send] | str]:
    """Build the router after decompose: ``Send`` to ``worker`` per subtask, else ``skip``."""

    def fan_out(state: AprState) -> list[Send] | str:
        plan = plan_of(state)
        subtasks = plan["subtasks"]
        if plan["strategy"] != "parallel" or not subtasks:
            return skip
        return [
            Send(
                worker,
                WorkerInput(
                    task=state.get("task", ""),
                    context=state.get("context", "") or "",
                    merge=plan["merge"] or "synthesize",
                    width=len(subtasks),
                    subtask=subtask,
                    run_id=state.get("run_id", ""),
                    depth=state.get("depth", 0),
                ),
            )
            for subtask in subtasks
        ]

    return fan_out
