"""What an endpoint's speed profile learns from a user's own runs, without ``apr calibrate``.

Not a test: it times whole runs on simulated servers (``apr_graph.testing.simulated``) and
takes about a minute.

    PYTHONPATH=. python scripts/eval_speed_learning.py --out /tmp/learning.json

One compiled graph per server and policy, an empty speed profile, and the decision's defaults
(router on, ``prefer="speed"``, learning on). The runs: a story first (the router answers it
with one call, which teaches one stream's rate only), then ``--tasks`` tasks of three
independent labelled parts. A scripted model writes as much as a real one would: 150 words a
part, three times that for a direct answer to the whole task. The servers: ``gpu`` (batching
nearly free, 3.9x one stream at 4 streams) and ``cpu`` (a 2-core llama-server ``-np 4``, 1.37x
at 4). The policies, side by side in one process:

- ``now``: a profile with no figure for threads at once is not used to decide (the task
  forks as planned, and its threads measure the rest);
- ``one-stream``: the decision before this change, which read such a profile as "threads at
  once decode no faster than one".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any
from unittest import mock

from apr_graph import compile_apr_graph
from apr_graph.settings import AprSettings
from apr_graph.testing import RecordedRequest, Reply
from apr_graph.testing.simulated import LatencyModel, SimulatedServer

STORY = "Write a short story about a fisherman who finds a map in a bottle."
TASKS = [
    "Answer each part on its own: (a) describe how bees make honey, (b) describe how glass "
    "is made, (c) describe how paper is recycled.",
    "Write three separate notes: (1) on keeping houseplants alive, (2) on storing coffee "
    "beans, (3) on cleaning a cast-iron pan.",
    "Explain each of these independently: (a) what a mortgage is, (b) what an index fund "
    "is, (c) what compound interest is.",
]
PART_WORDS = 150
SERVERS = {"gpu": LatencyModel.gpu(4), "cpu": LatencyModel.cpu(20)}


def scripted_model(request: RecordedRequest) -> Reply:
    """Plans three parts; a part's answer is ``PART_WORDS`` words, a direct answer to a
    three-part task three times that (a story: the same)."""
    body = request.body or {}
    if request.system_message.startswith("You are the planner"):
        return Reply(
            content={"strategy": "parallel", "merge": "concat", "subtasks": ["a", "b", "c"]}
        )
    words = 3 * PART_WORDS if request.role == "planner" else PART_WORDS
    words = min(words, int(body.get("max_tokens") or words))
    return Reply(content=" ".join(f"w{i}" for i in range(words)))


async def sequence(kind: str, policy: str, tasks: int) -> list[dict[str, Any]]:
    """The runs of one server and policy, each with its decision and wall time."""
    server = SimulatedServer(scripted_model, latency=SERVERS[kind]).start()
    try:
        settings = AprSettings(
            base_url=server.base_url, model="test-model", speed_file="", prefer="speed"
        )
        app = compile_apr_graph(settings=settings)
        rows = []
        for index, task in enumerate([STORY, *(TASKS * tasks)[:tasks]]):
            started = time.perf_counter()
            old = mock.patch("apr_graph.decide._measured", return_value=True)
            with old if policy == "one-stream" else contextlib.nullcontext():
                result = await app.ainvoke({"task": task})
            decision = result["plan"]["decision"]
            rows.append(
                {
                    "run": index,
                    "task": "story" if task == STORY else "three parts",
                    "choice": decision["choice"],
                    "by": decision["by"],
                    "wall_s": round(time.perf_counter() - started, 3),
                    "threads": len(result["threads"]),
                }
            )
        return rows
    finally:
        server.stop()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5, help="three-part tasks after the story")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the runs")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"tasks": args.tasks, "part_words": PART_WORDS, "runs": {}}
    lines = [
        "| server | policy | decisions (story, then the three-part tasks) | three-part wall s |",
        "|---|---|---|---|",
    ]
    for kind in SERVERS:
        for policy in ("one-stream", "now"):
            rows = await sequence(kind, policy, args.tasks)
            results["runs"][f"{kind}/{policy}"] = rows
            said = ", ".join(f"{r['choice']} ({r['by']})" for r in rows)
            wall = sum(r["wall_s"] for r in rows if r["task"] != "story")
            lines.append(f"| {kind} | {policy} | {said} | {wall:.2f} |")
            print(lines[-1], flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
