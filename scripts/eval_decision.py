"""Evaluate the fork decision on held-out labelled material against a real server.

Not a test: it needs a running model server and takes minutes. It writes its figures to a
JSON file and prints a markdown summary.

    python scripts/eval_decision.py --base-url http://127.0.0.1:8090/v1 --model qwen \\
        --out data/decision/real-model.json

Sets (``--sets``, comma-separated):

- ``sot``: Skeleton-of-Thought's labelled Vicuna questions (held out; never trained on): the
  decision only (router, then the planner call where the router lets the task through),
  for ``prefer="quality"`` (what the task is) and ``prefer="speed"`` (what pays here), and
  the planner alone (the decision before the router existed) for comparison.
- ``dev``: the same three decisions on a sample of the development set (LIMA labels).
- ``gsm8k``: GSM8K test problems, full runs side by side, interleaved: one sequential
  call vs apr-graph (``prefer="speed"``, the endpoint's stored speed profile: run
  ``apr calibrate`` first). Single problems (label 0) and three-problem tasks (label 1).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from apr_graph.bench.runner import decision_rows
from apr_graph.bench.strategies import Outcome, run_strategy
from apr_graph.bench.suites import Task
from apr_graph.decide import after_plan, before_plan, speed_store
from apr_graph.llm import LLMClient
from apr_graph.plan import labelled_parts, normalise_plan
from apr_graph.plan_schema import Plan, plan_json_schema
from apr_graph.prompts import planner_messages
from apr_graph.settings import AprSettings
from apr_graph.speed_store import profile_key

DATA = Path(__file__).resolve().parent.parent / "data" / "decision"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _numbers(text: str) -> list[float]:
    found = []
    for raw in _NUMBER.findall(text):
        try:
            found.append(float(raw.replace(",", "")))
        except ValueError:
            continue
    return found


def check_single(expected: str) -> Any:
    """Right when the answer's last number is the expected one (GSM8K's convention)."""
    want = float(expected)

    def check(answer: str) -> bool:
        numbers = _numbers(answer)
        return bool(numbers) and abs(numbers[-1] - want) < 1e-6

    return check


def check_all(expected: list[str]) -> Any:
    """Right when every expected number appears in the answer, in order."""
    wanted = [float(e) for e in expected]

    def check(answer: str) -> bool:
        numbers, at = _numbers(answer), 0
        for want in wanted:
            while at < len(numbers) and abs(numbers[at] - want) > 1e-6:
                at += 1
            if at == len(numbers):
                return False
            at += 1
        return True

    return check


async def decide_only(
    client: LLMClient, settings: AprSettings, task: str, width: int
) -> dict[str, Any]:
    """The run's decision as the decompose node takes it, without running the threads."""
    store = speed_store(settings)
    profile = store.get(profile_key(settings, client.base_url))
    profile = profile if settings.prefer == "speed" else None
    started = time.time()
    decision, shape = before_plan(task, "", settings, profile, width=width, depth=0)
    if decision is not None:
        return dict(decision) | {"seconds": round(time.time() - started, 2), "planned": False}
    labels = list(labelled_parts(task))
    labels = labels if len(labels) <= settings.max_threads else []
    plan, _ = await client.structured(
        planner_messages(task, "", settings.max_threads, width, None, labels),
        Plan,
        role="planner",
        schema=plan_json_schema(settings.max_threads, labels),
    )
    record = normalise_plan(plan, settings, task=task)
    decision = after_plan(
        record, task, "", settings, profile, shape, width=width, spent_s=time.time() - started
    )
    return dict(decision) | {"seconds": round(time.time() - started, 2), "planned": True}


def _balanced(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    pos = [r for r in rows if r["label"] == 1]
    neg = [r for r in rows if r["label"] == 0]
    tpr = sum(r[key] == "parallel" for r in pos) / len(pos) if pos else 0.0
    tnr = sum(r[key] == "direct" for r in neg) / len(neg) if neg else 0.0
    return {
        "n": len(rows),
        "label_1": len(pos),
        "parallel": sum(r[key] == "parallel" for r in rows),
        "parallel_of_label_1": sum(r[key] == "parallel" for r in pos),
        "direct_of_label_0": sum(r[key] == "direct" for r in neg),
        "balanced_accuracy": round((tpr + tnr) / 2, 3),
    }


WAYS: dict[str, dict[str, Any]] = {
    "planner_alone": {"router": False, "prefer": "quality"},
    "quality": {"router": True, "prefer": "quality"},
    "speed": {"router": True, "prefer": "speed"},
}


async def eval_labels(
    client: LLMClient, rows: list[dict[str, Any]], name: str, width: int, names: list[str]
) -> dict[str, Any]:
    """The chosen decisions (``WAYS``) on labelled prompts."""
    ways = {n: WAYS[n] for n in names}
    results = []
    for index, row in enumerate(rows):
        entry: dict[str, Any] = {"prompt": row["prompt"][:120], "label": row["label"]}
        for way, update in ways.items():
            settings = client.settings.model_copy(update=update)
            decided = await decide_only(client.for_run(settings), settings, row["prompt"], width)
            entry[way] = decided["choice"]
            entry[f"{way}_by"] = decided["by"]
            entry[f"{way}_s"] = decided["seconds"]
        _log(
            f"{name} {index + 1}/{len(rows)} label={row['label']} "
            + " ".join(f"{w}={entry[w]}" for w in ways)
        )
        results.append(entry)
    return {
        "rows": results,
        "summary": {way: _balanced(results, way) for way in ways},
    }


def gsm8k_tasks() -> list[Task]:
    rows = [json.loads(line) for line in (DATA / "heldout_gsm8k_test.jsonl").open()]
    tasks = []
    for row in rows:
        answers = [str(a) for a in row["answers"]]
        single = row["label"] == 0
        tasks.append(
            Task(
                "gsm8k" if single else "gsm8k3",
                row["source"],
                row["prompt"],
                [row["prompt"]],
                answers,
                check=check_single(answers[0]) if single else check_all(answers),
                splits=not single,
            )
        )
    return tasks


async def eval_gsm8k(client: LLMClient) -> dict[str, Any]:
    """Sequential vs adaptive on the held-out GSM8K tasks, interleaved."""
    tasks = gsm8k_tasks()
    outcomes: list[Outcome] = []
    strategies = ["sequential", "adaptive"]
    for index, task in enumerate(tasks):
        order = strategies if index % 2 == 0 else strategies[::-1]
        for strategy in order:
            outcome = await run_strategy(strategy, client, task)
            outcomes.append(outcome)
            _log(
                f"{task.id} {strategy} {'right' if outcome.correct else 'wrong'} "
                f"{outcome.wall_s:.1f}s decision={outcome.decision} by={outcome.decided_by} "
                f"{outcome.error or ''}"
            )
    summary = {}
    for suite in ("gsm8k", "gsm8k3"):
        mine = [o for o in outcomes if o.suite == suite]
        entry = {}
        for strategy in strategies:
            runs = [o for o in mine if o.strategy == strategy]
            entry[strategy] = {
                "correct": sum(o.correct for o in runs),
                "tasks": len(runs),
                "wall_median_s": round(statistics.median(o.wall_s for o in runs), 2),
            }
        entry["ratio"] = round(
            entry["adaptive"]["wall_median_s"] / entry["sequential"]["wall_median_s"], 3
        )
        summary[suite] = entry
    return {
        "outcomes": [o.as_dict() for o in outcomes],
        "summary": summary,
        "decision": decision_rows(outcomes, tasks),
    }


def _dev_sample(count: int) -> list[dict[str, Any]]:
    """``count`` prompts of the development set's LIMA labels, half of each label."""
    with (DATA / "sot_lima_router.csv").open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=";")
        next(reader)  # label;request
        rows = [(int(label), request) for label, request in reader]
    rng = random.Random(0)
    ones = [r for r in rows if r[0] == 1]
    zeros = [r for r in rows if r[0] == 0]
    picked = rng.sample(ones, count // 2) + rng.sample(zeros, count - count // 2)
    return [{"prompt": request, "label": label} for label, request in picked]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--sets", default="sot,gsm8k")
    parser.add_argument("--dev-count", type=int, default=40)
    parser.add_argument("--ways", default=",".join(WAYS), help="decisions to compare")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    settings = AprSettings(base_url=args.base_url, model=args.model)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "started": time.ctime()}
    async with LLMClient(settings) as client:
        report = await client.capacity_report()
        width = report["limit"]
        results["capacity"] = report
        store = speed_store(settings)
        profile = store.get(profile_key(settings, client.base_url))
        results["speed_profile"] = None if profile is None else profile.source
        sets = [s for s in args.sets.split(",") if s]
        ways = [w for w in args.ways.split(",") if w]
        if "sot" in sets:
            rows = [json.loads(line) for line in (DATA / "heldout_sot_vicuna.jsonl").open()]
            results["sot"] = await eval_labels(client, rows, "sot", width, ways)
        if "dev" in sets:
            results["dev"] = await eval_labels(
                client, _dev_sample(args.dev_count), "dev", width, ways
            )
        if "gsm8k" in sets:
            results["gsm8k"] = await eval_gsm8k(client)
    results["ended"] = time.ctime()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for name in ("sot", "dev"):
        if name in results:
            print(f"## {name}")
            for way, row in results[name]["summary"].items():
                print(f"- {way}: {row}")
    if "gsm8k" in results:
        print("## gsm8k")
        for suite, row in results["gsm8k"]["summary"].items():
            print(f"- {suite}: {row}")
        for row in results["gsm8k"]["decision"]:
            print(f"- decision {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
