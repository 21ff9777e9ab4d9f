"""The strategies the benchmark compares, each run on the same client and tasks.

- ``sequential``: one chain-of-thought call (the baseline users would otherwise use);
- ``adaptive``: apr-graph, the model decides direct or parallel;
- ``split``: Skeleton-of-Thought style fixed fan-out: a skeleton of ``points`` points, each
  expanded in parallel, answers concatenated, whatever the task;
- ``native``: apr-graph's native mode, for models that write their own ThreadWeaver tags
  (only meaningful on such a model, or on the simulator).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from apr_graph.bench.suites import Task
from apr_graph.graph import compile_apr_graph
from apr_graph.llm import LLMClient
from apr_graph.prompts import direct_messages
from apr_graph.responses import Completion
from apr_graph.settings import AprSettings

__all__ = ["STRATEGIES", "Outcome", "native_settings", "run_strategy"]

STRATEGIES = ("sequential", "adaptive", "split", "native")

_SKELETON = (
    "Write the skeleton of an answer to the task: exactly {points} points, a few words each. "
    'Reply with JSON: {{"points": ["...", ...]}}.'
)
_EXPAND = "Task: {task}\nSkeleton: {skeleton}\nExpand point {index} of {count}: {point}"


@dataclass
class Outcome:
    """One strategy on one task."""

    strategy: str
    suite: str
    task_id: str
    correct: bool
    wall_s: float
    calls: int
    prompt_tokens: int
    completion_tokens: int
    critical_path_tokens: int
    answer: str
    error: str | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)
    parts_correct: int = 0
    parts_total: int = 1
    decision: str | None = None
    """``direct`` or ``parallel``: what an apr-graph run chose (``None`` for the others)."""
    decided_by: str | None = None
    predicted_wall_s: float | None = None
    """The decision's predicted wall time of the way it chose (with a speed profile)."""
    predicted_other_s: float | None = None
    """... and of the way it did not choose."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class _Skeleton(BaseModel):
    points: list[str] = Field(default_factory=list)


def _span(completion: Completion, label: str, origin: float) -> dict[str, Any]:
    return {
        "label": label,
        "start": round(completion.started_at - origin, 4),
        "end": round(completion.ended_at - origin, 4),
    }


async def _sequential(client: LLMClient, task: Task) -> Outcome:
    started = time.time()
    messages = direct_messages(task.prompt, "", client.settings.direct_instructions)
    completion = await client.chat(
        messages, role="sequential", stream=True, max_tokens=client.settings.worker_max_tokens * 4
    )
    return Outcome(
        "sequential",
        task.suite,
        task.id,
        task.check(completion.text),
        round(time.time() - started, 4),
        1,
        completion.prompt_tokens,
        completion.completion_tokens,
        completion.completion_tokens,
        completion.text,
        timeline=[_span(completion, "sequential", started)],
    )


async def _adaptive(client: LLMClient, task: Task, name: str) -> Outcome:
    started = time.time()
    app = compile_apr_graph(client=client)  # runs on the client's settings (native or not)
    result = await app.ainvoke({"task": task.prompt})
    metrics = result["metrics"]
    answer = result.get("answer") or ""
    timeline = [
        {
            "label": c["thread_id"] or c["role"],
            "start": round(c["started_at"] - started, 4),
            "end": round(c["ended_at"] - started, 4),
        }
        for c in result.get("calls") or []
    ]
    return Outcome(
        name,
        task.suite,
        task.id,
        task.check(answer),
        round(time.time() - started, 4),
        metrics["model_calls"],
        metrics["prompt_tokens"],
        metrics["completion_tokens"],
        metrics["critical_path_tokens"],
        answer,
        timeline=timeline,
        decision=metrics.get("decision") or result["plan"]["strategy"],
        decided_by=metrics.get("decided_by"),
        predicted_wall_s=metrics.get("predicted_wall_s"),
        predicted_other_s=metrics.get("predicted_other_s"),
    )


async def _split(client: LLMClient, task: Task, points: int) -> Outcome:
    started = time.time()
    system = _SKELETON.format(points=points)
    skeleton, first = await client.structured(
        [{"role": "system", "content": system}, {"role": "user", "content": task.prompt}],
        _Skeleton,
        role="skeleton",
    )
    chosen = (skeleton.points + [f"point {i + 1}" for i in range(points)])[:points]
    listing = "; ".join(chosen)
    expansions = await asyncio.gather(
        *[
            client.chat(
                [
                    {
                        "role": "user",
                        "content": _EXPAND.format(
                            task=task.prompt,
                            skeleton=listing,
                            index=i + 1,
                            count=points,
                            point=point,
                        ),
                    }
                ],
                role="expand",
                stream=True,
            )
            for i, point in enumerate(chosen)
        ]
    )
    answer = "\n".join(e.text for e in expansions)
    return Outcome(
        "split",
        task.suite,
        task.id,
        task.check(answer),
        round(time.time() - started, 4),
        1 + points,
        first.prompt_tokens + sum(e.prompt_tokens for e in expansions),
        first.completion_tokens + sum(e.completion_tokens for e in expansions),
        first.completion_tokens + max(e.completion_tokens for e in expansions),
        answer,
        timeline=[_span(first, "skeleton", started)]
        + [_span(e, f"point {i + 1}", started) for i, e in enumerate(expansions)],
    )


def native_settings(settings: AprSettings) -> AprSettings:
    """The settings of the ``native`` strategy: ThreadWeaver's tags, on the same server."""
    return settings.model_copy(update={"native": "threadweaver"})


async def run_strategy(strategy: str, client: LLMClient, task: Task, *, points: int = 4) -> Outcome:
    """Run one strategy on one task; a failure is an incorrect outcome, not a crash.

    ``native`` runs on ``client`` if its settings are native (see ``native_settings``), else
    on a client of its own for this run.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if strategy == "native" and client.settings.native is None:
        async with LLMClient(native_settings(client.settings)) as native:
            return await run_strategy(strategy, native, task, points=points)
    started = time.time()
    try:
        if strategy == "sequential":
            outcome = await _sequential(client, task)
        elif strategy == "split":
            outcome = await _split(client, task, points)
        else:
            outcome = await _adaptive(client, task, strategy)
    except Exception as exc:
        outcome = Outcome(
            strategy,
            task.suite,
            task.id,
            False,
            round(time.time() - started, 4),
            0,
            0,
            0,
            0,
            "",
            error=f"{type(exc).__name__}: {exc}",
        )
    outcome.parts_correct, outcome.parts_total = task.part_score(outcome.answer)
    return outcome
