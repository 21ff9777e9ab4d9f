"""The fan-out edges: one ``Send`` per subtask, made at run time from the plan.

After decompose every subtask is sent; after the workers (the join), those that deferred for a
dependency not running beside them are sent again, with the results they need. Both read only
graph state, so a run resumed from a checkpoint, in any process, is routed as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from langgraph.types import Send

from apr_graph.board import Boards
from apr_graph.plan import plan_of
from apr_graph.state import AprState, SubtaskRecord, ThreadRecord, WorkerInput

__all__ = ["make_fan_out", "make_join", "waiting_ids"]


def waiting_ids(state: AprState) -> list[str]:
    """Ids of the subtasks that deferred and have no final record yet."""
    final = {t["id"] for t in state.get("threads") or []}
    return [sid for sid in dict.fromkeys(state.get("waiting") or []) if sid not in final]


def _in_order(subtasks: list[SubtaskRecord]) -> list[SubtaskRecord]:
    """``subtasks`` with every dependency before its dependents (stable otherwise): LangGraph
    admits a step's tasks in ``Send`` order, first come, first served, so a thread that waits
    for a sibling only ever waits for one that holds a slot already."""
    by_id = {s["id"]: s for s in subtasks}
    placed: dict[str, SubtaskRecord] = {}

    def place(subtask: SubtaskRecord, seen: frozenset[str]) -> None:
        if subtask["id"] in placed or subtask["id"] in seen:
            return
        for dep in subtask["depends_on"]:
            if dep in by_id:
                place(by_id[dep], seen | {subtask["id"]})
        placed[subtask["id"]] = subtask

    for subtask in subtasks:
        place(subtask, frozenset())
    return list(placed.values())


def _sends(
    state: AprState,
    worker: str,
    boards: Boards,
    subtasks: Iterable[SubtaskRecord],
    results: dict[str, ThreadRecord] | None,
) -> list[Send]:
    """``results``: the finished threads of the run, for subtasks sent again (their payload
    then always names the dependencies it carries, and they never defer again)."""
    plan = plan_of(state)
    ordered = _in_order(list(subtasks))
    run_id = state.get("run_id", "")
    board = boards.get(run_id)
    if board is not None:  # these threads run side by side in this process: they may wait
        board.scheduled = {s["id"] for s in ordered}
        board.catch_up(state.get("calls") or [])
    sends = []
    for subtask in ordered:
        payload = WorkerInput(
            task=state.get("task", ""),
            context=state.get("context", "") or "",
            merge=plan["merge"] or "synthesize",
            width=len(plan["subtasks"]),
            subtask=subtask,
            run_id=run_id,
            depth=state.get("depth", 0),
        )
        if plan.get("pieces"):
            payload["piece"] = True
        if results is not None:
            payload["dependencies"] = [results[d] for d in subtask["depends_on"] if d in results]
        sends.append(Send(worker, payload))
    return sends


def make_fan_out(worker: str, skip: str, boards: Boards) -> Callable[[AprState], list[Send] | str]:
    """Build the router after decompose: ``Send`` to ``worker`` per subtask, else ``skip``."""

    def fan_out(state: AprState) -> list[Send] | str:
        plan = plan_of(state)
        if plan["strategy"] != "parallel" or not plan["subtasks"]:
            return skip
        return _sends(state, worker, boards, plan["subtasks"], None)

    return fan_out


def make_join(worker: str, done: str, boards: Boards) -> Callable[[AprState], list[Send] | str]:
    """Build the router after the workers: the deferred subtasks whose dependencies all have
    results go again (with those results), else the run goes on to ``done``."""

    def join(state: AprState) -> list[Send] | str:
        waiting = waiting_ids(state)
        if not waiting:
            return done
        results = {t["id"]: t for t in state.get("threads") or []}
        by_id = {s["id"]: s for s in plan_of(state)["subtasks"]}
        pending = [by_id[sid] for sid in waiting if sid in by_id]
        if not pending:
            return done
        ready = [s for s in pending if all(d in results for d in s["depends_on"])]
        # In a plan (a DAG) some waiting subtask always has every result it needs; should
        # a dependency have no record at all, the rest go anyway rather than wait forever.
        return _sends(state, worker, boards, ready or pending, results)

    return join
