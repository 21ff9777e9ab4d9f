"""What the planner's plans become once repaired, for general multi-part tasks, on a real server.

Not a test: it asks a real OpenAI-compatible server to plan each task (the router off and
``prefer="quality"``, so every task reaches the planner) and stops each run at its plan
(``review_plan``), so no thread is sent. It writes each plan's goals and notes, or the
answer when the plan became a direct one.

    PYTHONPATH=. python scripts/eval_plan_repair.py --base-url http://127.0.0.1:8090/v1 \\
        --model qwen --out /tmp/plan-repair.json

The tasks are everyday requests of several parts (none from a benchmark). A plan is
degenerate when a goal is a label ("idea1": a name for a part, not the part) or when every
goal repeats one goal under the planner's own ``concat``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

from langgraph.checkpoint.memory import InMemorySaver

from apr_graph import AprSettings, compile_apr_graph

TASKS = [
    "Give me three ideas for a birthday party, a recipe for pancakes, and a haiku about autumn.",
    "What is the boiling point of water in Fahrenheit, who wrote Hamlet, and what is the "
    "largest planet?",
    "Suggest a name for a bakery, a slogan for a gym, and a title for a mystery novel.",
    "Explain what DNS, TCP and HTTP are.",
    'Translate "good morning" into Spanish, German and Japanese.',
    "List the pros and cons of remote work, and suggest two ways to stay productive at home.",
    "Write a limerick about a cat, a tweet announcing a product launch, and a one-line joke "
    "about programmers.",
    "What are the capitals of Canada, Australia and Brazil?",
    "Summarize the causes of World War I and the causes of World War II.",
    "Recommend a book, a movie and a podcast for someone who likes science.",
    "Compare cats and dogs as pets, and compare apartments and houses for a family.",
    "How do I boil an egg, how do I make tea, and how do I toast bread?",
]

_LABEL = re.compile(r"(?=[\w-]*[a-z])(?=[\w-]*[\d_])[\w-]+", re.I)


_ATTEMPT = re.compile(r" \(attempt \d+ of \d+: [^)]*\)$")
"""The hint plan repair adds to each repeat of one goal (a vote of attempts)."""


def degenerate(goals: list[str]) -> bool:
    """Whether a plan's goals include a label, or all repeat one goal."""
    keys = {" ".join(_ATTEMPT.sub("", g).lower().split()).rstrip(".") for g in goals}
    return any(_LABEL.fullmatch(g.strip()) for g in goals) or (len(goals) > 1 and len(keys) == 1)


async def run(base_url: str, model: str) -> list[dict[str, Any]]:
    settings = AprSettings(
        base_url=base_url, model=model, router=False, prefer="quality", speed_file=""
    )
    app = compile_apr_graph(settings=settings, checkpointer=InMemorySaver())
    rows = []
    for index, task in enumerate(TASKS):
        started = time.monotonic()
        config = {"configurable": {"thread_id": f"plan-{index}"}}
        result = await app.ainvoke({"task": task}, config, context={"review_plan": True})
        paused = result.get("__interrupt__")
        plan = paused[0].value["plan"] if paused else result["plan"]
        goals = [s["goal"] for s in plan["subtasks"]]
        row = {
            "task": task,
            "strategy": plan["strategy"],
            "merge": plan["merge"],
            "goals": goals,
            "degenerate": degenerate(goals),
            "notes": plan["notes"],
            "answer": None if paused else result.get("answer"),
            "seconds": round(time.monotonic() - started, 2),
        }
        rows.append(row)
        print(json.dumps(row)[:300], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = asyncio.run(run(args.base_url, args.model))
    summary = {
        "tasks": len(rows),
        "parallel": sum(r["strategy"] == "parallel" for r in rows),
        "degenerate_plans_run": sum(r["degenerate"] and r["strategy"] == "parallel" for r in rows),
    }
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
