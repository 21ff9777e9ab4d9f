"""The runs ``apr ask --thread-id`` kept: ``apr runs`` lists them, ``apr resume`` checks first.

Reading the SQLite file needs no model server: a run id that is unknown is reported (with
the ids that are stored) before anything is started.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from apr_graph.durable import StoredRun, stored_runs
from apr_graph.graph import create_apr_graph
from apr_graph.settings import AprSettings

__all__ = ["describe_runs", "list_runs", "missing_run"]

_OFFLINE = AprSettings(base_url="http://127.0.0.1:9/v1", probe_capacity=False)
"""Settings for a graph that only reads its checkpoints: it never sends a request."""


async def _list(db: Path) -> list[StoredRun]:
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        app = create_apr_graph(settings=_OFFLINE).compile(checkpointer=saver)
        return await stored_runs(app)


def list_runs(db: Path) -> list[StoredRun]:
    """The runs stored in ``db``, newest first (none if the file does not exist)."""
    return asyncio.run(_list(db)) if db.exists() else []


def describe_runs(runs: list[StoredRun]) -> str:
    """One line per run: id, status, last update and the start of its task."""
    if not runs:
        return "no stored runs"
    width = max(len(run.thread_id) for run in runs)
    lines = []
    for run in runs:
        task = " ".join(run.task.split())
        task = task if len(task) <= 60 else task[:57] + "..."
        lines.append(f"{run.thread_id:<{width}}  {run.status:<11}  {run.updated_at[:19]}  {task}")
    return "\n".join(lines)


def missing_run(db: Path, thread_id: str) -> str | None:
    """What to tell a user who names a run ``db`` does not hold (None if it holds it)."""
    stored = list_runs(db)
    if any(run.thread_id == thread_id for run in stored):
        return None
    listing = "; stored runs:\n" + describe_runs(stored) if stored else " (it holds no runs)"
    return f"no run is stored under thread id {thread_id!r} in {db}{listing}"
