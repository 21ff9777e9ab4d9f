"""Resuming a checkpointed run without redoing finished work.

With any LangGraph checkpointer, a run interrupted mid fan-out (crash, SIGKILL, Ctrl-C)
keeps the plan and the results of the threads that finished. ``resume_run`` continues it:
decompose is not called again, finished threads are not re-run, and the threads that depend
on them get their results. Settings and the API key are supplied again by the caller; they
are never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver

from apr_graph.errors import InputError
from apr_graph.graph import WORKER, App, boards_of
from apr_graph.plan import plan_of
from apr_graph.settings import AprSettings
from apr_graph.state import AprOutput, ThreadRecord

__all__ = ["StoredRun", "prepare_resume", "resume_run", "run_status", "stored_runs"]


async def run_status(app: App, config: RunnableConfig) -> tuple[str, dict[str, Any]]:
    """``("new" | "interrupted" | "finished", values)`` of the run stored under ``config``."""
    snapshot = await app.aget_state(config)
    if not snapshot.values:
        return "new", {}
    return ("interrupted" if snapshot.next else "finished"), dict(snapshot.values)


async def prepare_resume(app: App, config: RunnableConfig, *, settings: AprSettings) -> None:
    """Get an interrupted run ready to continue with ``app.astream(None, config)``.

    The threads that finished before the interruption are made visible again to the
    threads that depend on them (their results live in the checkpoint).

    Raises:
        InputError: there is no run under this thread id, or it already finished.
    """
    snapshot = await app.aget_state(config)
    thread_id = (config.get("configurable") or {}).get("thread_id")
    if not snapshot.values:
        raise InputError(f"no run is stored under thread id {thread_id!r}")
    if not snapshot.next:
        raise InputError(f"the run {thread_id!r} already finished; nothing to resume")
    values = dict(snapshot.values)
    finished: list[ThreadRecord] = []
    for task in snapshot.tasks:
        if task.name == WORKER and isinstance(task.result, dict):
            finished.extend(t for t in task.result.get("threads", []) if t.get("parent") is None)
    if values.get("run_id"):
        plan = plan_of(values)
        boards_of(app).revive(
            settings,
            values["run_id"],
            merge=plan["merge"],
            width=len(plan["subtasks"]),
            finished=finished,
        )


async def resume_run(app: App, config: RunnableConfig, *, settings: AprSettings) -> AprOutput:
    """Continue an interrupted run and return its output (see ``prepare_resume``).

    Example:
        >>> async with AsyncSqliteSaver.from_conn_string("runs.sqlite") as saver:  # doctest: +SKIP
        ...     app = create_apr_graph(settings=settings).compile(checkpointer=saver)
        ...     result = await resume_run(app, {"configurable": {"thread_id": "job-1"}},
        ...                               settings=settings)
    """
    await prepare_resume(app, config, settings=settings)
    return cast(AprOutput, await app.ainvoke(None, config, durability="sync"))


@dataclass(frozen=True)
class StoredRun:
    """One run kept by a checkpointer: its id, ``interrupted`` or ``finished``, and its task."""

    thread_id: str
    status: str
    task: str
    updated_at: str


async def stored_runs(app: App) -> list[StoredRun]:
    """Every run the app's checkpointer holds, newest first."""
    saver = app.checkpointer
    if not isinstance(saver, BaseCheckpointSaver):
        return []
    latest: dict[str, str] = {}
    async for item in saver.alist(None):
        thread_id = str(item.config["configurable"]["thread_id"])
        latest.setdefault(thread_id, str(item.checkpoint.get("ts", "")))
    runs = []
    for thread_id, updated in latest.items():
        status, values = await run_status(app, {"configurable": {"thread_id": thread_id}})
        runs.append(StoredRun(thread_id, status, str(values.get("task", "")), updated))
    return sorted(runs, key=lambda run: run.updated_at, reverse=True)
