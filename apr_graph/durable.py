"""Resuming a checkpointed run without redoing finished work.

LangGraph's own resume keeps an interrupted run's plan and finished threads; ``resume_run``
adds a clear error for an unknown or finished run. Settings and the API key come from the
graph; they are never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver

from apr_graph.errors import InputError
from apr_graph.graph import App
from apr_graph.settings import AprSettings
from apr_graph.state import AprOutput

__all__ = ["StoredRun", "prepare_resume", "resume_run", "run_status", "stored_runs"]


async def run_status(app: App, config: RunnableConfig) -> tuple[str, dict[str, Any]]:
    """``("new" | "review" | "interrupted" | "finished", values)`` of the run stored under
    ``config``; ``review``: paused for its plan to be reviewed (``AprSettings.review_plan``)."""
    snapshot = await app.aget_state(config)
    if not snapshot.values:
        return "new", {}
    status = "review" if snapshot.interrupts else "interrupted" if snapshot.next else "finished"
    return status, dict(snapshot.values)


async def prepare_resume(
    app: App, config: RunnableConfig, *, settings: AprSettings | None = None
) -> None:
    """Check that ``config`` names an interrupted run (any LangGraph resume, e.g.
    ``app.ainvoke(None, config)``, then finishes it). ``settings`` is ignored (the graph has
    them): accepted for calls written for earlier versions.

    Raises:
        InputError: there is no run under this thread id, or it already finished.
    """
    del settings
    status, _ = await run_status(app, config)
    thread_id = (config.get("configurable") or {}).get("thread_id")
    if status == "new":
        raise InputError(f"no run is stored under thread id {thread_id!r}")
    if status == "finished":
        raise InputError(f"the run {thread_id!r} already finished; nothing to resume")


async def resume_run(
    app: App, config: RunnableConfig, *, settings: AprSettings | None = None
) -> AprOutput:
    """Continue an interrupted run and return its output (``app.ainvoke(None, config)``
    after ``prepare_resume``'s check: a wrong id is a clear error, not an empty run).

    Example:
        >>> async with AsyncSqliteSaver.from_conn_string("runs.sqlite") as saver:  # doctest: +SKIP
        ...     app = create_apr_graph(settings=settings).compile(checkpointer=saver)
        ...     result = await resume_run(app, {"configurable": {"thread_id": "job-1"}})
    """
    await prepare_resume(app, config)
    return cast(AprOutput, await app.ainvoke(None, config, durability="sync"))


@dataclass(frozen=True)
class StoredRun:
    """One run kept by a checkpointer: its id, ``review``, ``interrupted`` or ``finished``, and
    its task."""

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
