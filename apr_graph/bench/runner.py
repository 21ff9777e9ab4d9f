"""Run suites and strategies side by side, interleaved, in one process."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from apr_graph.bench.strategies import Outcome, run_strategy
from apr_graph.bench.suites import Task, make_suite
from apr_graph.llm import LLMClient
from apr_graph.settings import AprSettings

__all__ = ["p90", "run_tasks", "scaling_rows", "summarise"]

Progress = Callable[[str], None]


async def run_tasks(
    client: LLMClient,
    settings: AprSettings,
    tasks: Sequence[Task],
    strategies: Sequence[str],
    *,
    points: int = 4,
    progress: Progress | None = None,
) -> list[Outcome]:
    """Every strategy on every task, one run at a time; the order of strategies rotates per
    task so no strategy always runs first (on a warm or cold server)."""
    outcomes: list[Outcome] = []
    for index, task in enumerate(tasks):
        shift = index % len(strategies)
        for strategy in [*strategies[shift:], *strategies[:shift]]:
            outcomes.append(await run_strategy(strategy, client, settings, task, points=points))
            if progress is not None:
                progress(f"{task.id} {strategy}")
    return outcomes


def p90(values: Sequence[float]) -> float:
    """The 90th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)] if ordered else 0.0


def summarise(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """One row per suite and strategy; speedup is against sequential on the same tasks."""
    rows: list[dict[str, Any]] = []
    suites = sorted({o.suite for o in outcomes})
    for suite in suites:
        mine = [o for o in outcomes if o.suite == suite]
        baseline = [o.wall_s for o in mine if o.strategy == "sequential"]
        for strategy in dict.fromkeys(o.strategy for o in mine):
            runs = [o for o in mine if o.strategy == strategy]
            walls = [o.wall_s for o in runs]
            median = statistics.median(walls)
            rows.append(
                {
                    "suite": suite,
                    "strategy": strategy,
                    "tasks": len(runs),
                    "accuracy": round(sum(o.correct for o in runs) / len(runs), 3),
                    "wall_median_s": round(median, 3),
                    "wall_p90_s": round(p90(walls), 3),
                    "critical_path_tokens": round(
                        statistics.mean(o.critical_path_tokens for o in runs), 1
                    ),
                    "total_tokens": round(
                        statistics.mean(o.prompt_tokens + o.completion_tokens for o in runs), 1
                    ),
                    "model_calls": round(statistics.mean(o.calls for o in runs), 2),
                    "speedup": round(statistics.median(baseline) / median, 2)
                    if baseline and median
                    else None,
                    "errors": sum(1 for o in runs if o.error),
                }
            )
    return rows


async def scaling_rows(
    client: LLMClient,
    settings: AprSettings,
    widths: Sequence[int],
    *,
    tasks_per_width: int,
    seed: int,
    progress: Progress | None = None,
    make_tasks: Callable[[int], list[Task]] | None = None,
) -> tuple[list[dict[str, Any]], list[Task]]:
    """Achieved vs ideal speedup of adaptive over sequential for ``widths`` independent parts.

    Ideal = sequential generated tokens / adaptive critical-path tokens: the speedup if time
    followed the longest chain of dependent tokens and nothing else.
    """
    rows: list[dict[str, Any]] = []
    all_tasks: list[Task] = []
    for width in widths:
        tasks = (
            make_tasks
            or (lambda w: make_suite("arithmetic", tasks_per_width, seed=seed + w, parts=w))
        )(width)
        all_tasks.extend(tasks)
        outcomes = await run_tasks(
            client, settings, tasks, ("sequential", "adaptive"), progress=progress
        )
        seq = [o for o in outcomes if o.strategy == "sequential"]
        apr = [o for o in outcomes if o.strategy == "adaptive"]
        achieved = statistics.median(o.wall_s for o in seq) / statistics.median(
            o.wall_s for o in apr
        )
        ideal = statistics.median(o.completion_tokens for o in seq) / statistics.median(
            o.critical_path_tokens for o in apr
        )
        rows.append(
            {
                "threads": width,
                "sequential_wall_s": round(statistics.median(o.wall_s for o in seq), 3),
                "adaptive_wall_s": round(statistics.median(o.wall_s for o in apr), 3),
                "achieved_speedup": round(achieved, 2),
                "ideal_speedup": round(ideal, 2),
                "fraction_of_ideal": round(achieved / ideal, 2),
                "accuracy_adaptive": round(sum(o.correct for o in apr) / len(apr), 2),
            }
        )
    return rows, all_tasks
