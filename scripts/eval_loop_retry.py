"""Direct answers that run away, before and after the loop retry, on a real server.

Not a test: it sends each task to a real OpenAI-compatible server under two policies, one
after the other in one process, and writes what each answer was.

    PYTHONPATH=. python scripts/eval_loop_retry.py --base-url http://127.0.0.1:8090/v1 \\
        --model qwen --out /tmp/loop-retry.json

- ``before``: ``retry_loops=False`` and no short-item rule (``loops.SHORT_ITEM_RUN`` out of
  reach): a direct answer that loops keeps what came before the loop;
- ``now``: the defaults: a list of short items that open alike is cut at its tenth, and a
  direct answer that loops before an eighth of its allowance is asked once more, told so, at
  ``loop_retry_temperature``.

The tasks are general questions that ask for lists (none from a benchmark). The router
answers them directly (one call), as it did in session 26.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any
from unittest import mock

from apr_graph import compile_apr_graph, loops
from apr_graph.settings import AprSettings

TASKS = [
    "List the pros and cons of Python, Rust and Go for writing a command-line tool.",
    "What are the advantages of PostgreSQL, MySQL and SQLite?",
    "Describe the features of Linux, Windows and macOS for developers.",
    "List the benefits of unit tests, integration tests and end-to-end tests.",
    "What should I pack for a week of hiking in the mountains?",
    "List the main features of React, Vue and Angular.",
    "Give me tips for improving sleep quality.",
    "What are the differences between REST, GraphQL and gRPC?",
    "List the uses of Docker in software development.",
    "What are the health benefits of walking, swimming and cycling?",
    "List common causes of slow web pages and how to fix each.",
    "What are the strengths and weaknesses of Java, C# and Kotlin?",
]


async def one(app: Any, task: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = await app.ainvoke({"task": task})
    wall = time.perf_counter() - started
    answers = [c for c in result["calls"] if c.get("mode") == "text"]
    return {
        "task": task,
        "strategy": result["plan"]["strategy"],
        "wall_s": round(wall, 2),
        "calls": len(result["calls"]),
        "completion_tokens": result["metrics"]["completion_tokens"],
        "finish": [c.get("finish_reason") for c in answers],
        "ends_in_loop": bool(answers) and answers[-1].get("finish_reason") == "loop",
        "answer_words": len(result["answer"].split()),
        "answer": result["answer"],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    base = AprSettings(base_url=args.base_url, model=args.model, speed_file="")
    apps = {
        "before": compile_apr_graph(settings=base.model_copy(update={"retry_loops": False})),
        "now": compile_apr_graph(settings=base),
    }
    rows: dict[str, list[dict[str, Any]]] = {"before": [], "now": []}
    for index, task in enumerate(TASKS[: args.tasks], 1):
        for policy, app in apps.items():
            with mock.patch.object(
                loops, "SHORT_ITEM_RUN", 10**9 if policy == "before" else loops.SHORT_ITEM_RUN
            ):
                row = await one(app, task)
            rows[policy].append(row)
            print(
                f"[{index}/{args.tasks}] {policy:6} {row['wall_s']:6.1f}s "
                f"{row['completion_tokens']:5d} tok finish={row['finish']} {task[:50]}",
                flush=True,
            )
    summary = {
        policy: {
            "answers_ending_in_a_loop": sum(r["ends_in_loop"] for r in got),
            "answers_with_a_loop": sum("loop" in r["finish"] for r in got),
            "wall_s": round(sum(r["wall_s"] for r in got), 1),
            "completion_tokens": sum(r["completion_tokens"] for r in got),
        }
        for policy, got in rows.items()
    }
    print(json.dumps(summary, indent=1))
    return {"summary": summary, "runs": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", type=int, default=len(TASKS))
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments))
    Path(arguments.out).write_text(json.dumps(figures, indent=1))
