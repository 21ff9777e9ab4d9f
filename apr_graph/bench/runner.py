"""Run suites and strategies side by side, interleaved, in one process."""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from apr_graph.bench.quality import not_a_win, wilson
from apr_graph.bench.strategies import Outcome, native_settings, run_strategy
from apr_graph.bench.suites import Task, make_suite
from apr_graph.errors import AprError
from apr_graph.llm import LLMClient

__all__ = ["decision_rows", "p90", "run_tasks", "scaling_rows", "summarise", "warm_up"]

Progress = Callable[[str], None]


async def warm_up(client: LLMClient) -> None:
    """One tiny untimed request, so the first measured run does not pay for what any first
    request pays (lazy imports, the connection); a failure here shows up in the runs."""
    with contextlib.suppress(AprError):
        await client.chat(
            [{"role": "user", "content": "Say OK."}], role="warmup", max_tokens=1, stream=True
        )


async def run_tasks(
    client: LLMClient,
    tasks: Sequence[Task],
    strategies: Sequence[str],
    *,
    points: int = 4,
    progress: Progress | None = None,
) -> list[Outcome]:
    """Every strategy on every task, one run at a time; the order of strategies rotates per
    task so no strategy always runs first (on a warm or cold server)."""
    outcomes: list[Outcome] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = dict.fromkeys(strategies, client)
        if "native" in strategies:  # one client with native settings for all native runs
            native = LLMClient(native_settings(client.settings))
            stack.push_async_callback(native.aclose)
            await warm_up(native)
            clients["native"] = native
        for index, task in enumerate(tasks):
            shift = index % len(strategies)
            for strategy in [*strategies[shift:], *strategies[:shift]]:
                outcome = await run_strategy(strategy, clients[strategy], task, points=points)
                outcomes.append(outcome)
                if progress is not None:
                    verdict = "error" if outcome.error else "right" if outcome.correct else "wrong"
                    progress(f"{task.id} {strategy} {verdict} {outcome.wall_s:.1f}s")
    return outcomes


def decision_rows(outcomes: Sequence[Outcome], tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """The fork decision per suite: how often apr-graph answered directly or forked, how
    often that agrees with the suite's label (where it has one), and the speedup over one
    sequential call its decision predicted beside the one measured on the same tasks."""
    label = {t.id: t.splits for t in tasks}
    rows: list[dict[str, Any]] = []
    for suite in sorted({o.suite for o in outcomes}):
        mine = [o for o in outcomes if o.suite == suite and o.decision is not None]
        base = {
            o.task_id: o.wall_s for o in outcomes if o.suite == suite and o.strategy == "sequential"
        }
        for strategy in dict.fromkeys(o.strategy for o in mine):
            runs = [o for o in mine if o.strategy == strategy]
            labelled = [o for o in runs if label.get(o.task_id) is not None]
            agree = sum((o.decision == "parallel") == label[o.task_id] for o in labelled)
            predicted = [
                o.predicted_other_s / o.predicted_wall_s if o.decision == "parallel" else 1.0
                for o in runs
                if o.predicted_wall_s and o.predicted_other_s
            ]
            actual = [base[o.task_id] / o.wall_s for o in runs if o.task_id in base and o.wall_s]
            rows.append(
                {
                    "suite": suite,
                    "strategy": strategy,
                    "tasks": len(runs),
                    "direct": sum(o.decision == "direct" for o in runs),
                    "parallel": sum(o.decision == "parallel" for o in runs),
                    "by": ", ".join(
                        f"{k} {v}"
                        for k, v in sorted(_counts(o.decided_by or "model" for o in runs).items())
                    ),
                    "agrees_with_label": f"{agree}/{len(labelled)}" if labelled else "n/a",
                    "predicted_speedup": round(statistics.median(predicted), 2)
                    if predicted
                    else None,
                    "actual_speedup": round(statistics.median(actual), 2) if actual else None,
                }
            )
    return rows


def _counts(items: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def p90(values: Sequence[float]) -> float:
    """The 90th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)] if ordered else 0.0


def _speedup(
    runs: Sequence[Outcome], baseline: Sequence[Outcome], speedup: float | None
) -> tuple[float | None, str]:
    """The speedup if it may be presented as one, else None and the reason."""
    if not baseline:
        return None, "no sequential baseline"
    note = not_a_win(
        sum(o.correct for o in runs),
        len(runs),
        sum(o.correct for o in baseline),
        len(baseline),
    )
    return (None, note) if note else (speedup, "")


def summarise(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """One row per suite and strategy; speedup is against sequential on the same tasks, and
    only at comparable accuracy (``speedup`` None and ``speedup_note`` saying why otherwise)."""
    rows: list[dict[str, Any]] = []
    suites = sorted({o.suite for o in outcomes})
    for suite in suites:
        mine = [o for o in outcomes if o.suite == suite]
        baseline = [o for o in mine if o.strategy == "sequential"]
        base_median = statistics.median(o.wall_s for o in baseline) if baseline else None
        first = ["sequential"] if baseline else []  # the baseline's row first
        for strategy in dict.fromkeys([*first, *(o.strategy for o in mine)]):
            runs = [o for o in mine if o.strategy == strategy]
            walls = [o.wall_s for o in runs]
            median = statistics.median(walls)
            correct = sum(o.correct for o in runs)
            low, high = wilson(correct, len(runs))
            parts = sum(o.parts_correct for o in runs), sum(o.parts_total for o in runs)
            speedup, note = _speedup(
                runs,
                baseline,
                round(base_median / median, 2) if base_median and median else None,
            )
            rows.append(
                {
                    "suite": suite,
                    "strategy": strategy,
                    "tasks": len(runs),
                    "correct": correct,
                    "accuracy": round(correct / len(runs), 3),
                    "ci95_low": round(low, 3),
                    "ci95_high": round(high, 3),
                    "parts_correct": parts[0],
                    "parts_total": parts[1],
                    "errors": sum(1 for o in runs if o.error),
                    "speedup": speedup,
                    "speedup_note": note,
                    "wall_median_s": round(median, 3),
                    "wall_p90_s": round(p90(walls), 3),
                    "critical_path_tokens": round(
                        statistics.mean(o.critical_path_tokens for o in runs), 1
                    ),
                    "total_tokens": round(
                        statistics.mean(o.prompt_tokens + o.completion_tokens for o in runs), 1
                    ),
                    "model_calls": round(statistics.mean(o.calls for o in runs), 2),
                }
            )
    return rows


async def scaling_rows(
    client: LLMClient,
    widths: Sequence[int],
    *,
    tasks_per_width: int,
    seed: int,
    progress: Progress | None = None,
    make_tasks: Callable[[int], list[Task]] | None = None,
    batch_slowdown: float | None = None,
) -> tuple[list[dict[str, Any]], list[Task]]:
    """Achieved vs ideal speedup of adaptive over sequential for ``widths`` independent parts.

    Ideal = sequential generated tokens / adaptive critical-path tokens: the speedup if time
    followed the longest chain of dependent tokens and nothing else. With the server's
    ``batch_slowdown`` (a decode step with ``k`` sequences takes ``1 + batch_slowdown * (k -
    1)`` times one alone; the simulated server declares it), also the server's ideal: the same
    tokens, with every critical-path token at the step time of ``width`` sequences decoding
    together, the best any client can get from that server (the plan's first tokens, decoded
    before the threads join, make it at most about 1% lower than exact).
    """
    rows: list[dict[str, Any]] = []
    all_tasks: list[Task] = []
    for width in widths:
        tasks = (
            make_tasks
            or (lambda w: make_suite("arithmetic", tasks_per_width, seed=seed + w, parts=w))
        )(width)
        all_tasks.extend(tasks)
        outcomes = await run_tasks(client, tasks, ("sequential", "adaptive"), progress=progress)
        seq = [o for o in outcomes if o.strategy == "sequential"]
        apr = [o for o in outcomes if o.strategy == "adaptive"]
        achieved = statistics.median(o.wall_s for o in seq) / statistics.median(
            o.wall_s for o in apr
        )
        ideal = statistics.median(o.completion_tokens for o in seq) / statistics.median(
            o.critical_path_tokens for o in apr
        )
        shown, note = _speedup(apr, seq, round(achieved, 2))
        rows.append(
            {
                "threads": width,
                "tasks": len(apr),
                "sequential_correct": sum(o.correct for o in seq),
                "adaptive_correct": sum(o.correct for o in apr),
                "achieved_speedup": shown,
                "ideal_speedup": round(ideal, 2) if shown is not None else None,
                "fraction_of_ideal": round(achieved / ideal, 2) if shown is not None else None,
                **_server_ideal(ideal, achieved, width, batch_slowdown, shown is not None),
                "speedup_note": note,
                "sequential_wall_s": round(statistics.median(o.wall_s for o in seq), 3),
                "adaptive_wall_s": round(statistics.median(o.wall_s for o in apr), 3),
            }
        )
    return rows, all_tasks


def _server_ideal(
    ideal: float, achieved: float, width: int, batch_slowdown: float | None, shown: bool
) -> dict[str, float | None]:
    """The ideal of a server whose batched steps are slower (``scaling_rows``), if it is known."""
    if batch_slowdown is None:
        return {}
    bound = ideal / (1 + batch_slowdown * (width - 1))
    return {
        "server_ideal_speedup": round(bound, 2) if shown else None,
        "fraction_of_server_ideal": round(achieved / bound, 2) if shown else None,
    }
