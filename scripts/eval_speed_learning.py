"""What an endpoint's speed profile learns from a user's own runs, without ``apr calibrate``.

Not a test: it times whole runs on simulated servers (``apr_graph.testing.simulated``), about
a minute, or on a real endpoint (``--base-url``, a few minutes on a CPU server).

    PYTHONPATH=. python scripts/eval_speed_learning.py --out /tmp/learning.json
    PYTHONPATH=. python scripts/eval_speed_learning.py --base-url http://127.0.0.1:8090/v1 \
        --model qwen --tasks 2 --out /tmp/learning-real.json

One compiled graph per server and policy, an empty speed profile (in memory), and the
decision's defaults (router on, ``prefer="speed"``, learning on). The runs: a story first (the
router answers it with one call, which teaches one stream's rate only), then ``--tasks`` tasks
of three independent labelled parts. On the simulated servers a scripted model writes as much
as a real one would: 150 words a part, three times that for a direct answer to the whole task.
The servers: ``gpu`` (batching nearly free, 3.9x one stream at 4 streams) and ``cpu`` (a 2-core
llama-server ``-np 4``, 1.37x at 4). The policies, side by side in one process:

- ``one-stream``: a profile with no figure for threads at once read as "threads at once
  decode no faster than one" (before session 23; simulated servers only);
- ``learn``: such a profile is not used to decide: the task forks as planned, and its threads
  measure the rest (``probe_speed=False``);
- ``probe``: the endpoint is measured (one short probe) before that first decision (the
  default since session 28).
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


async def sequence(
    kind: str, policy: str, tasks: int, endpoint: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """The runs of one server (simulated ``kind``, or the real ``endpoint``: its URL and
    model) and policy, each with its decision and wall time."""
    server = None if endpoint else SimulatedServer(scripted_model, latency=SERVERS[kind]).start()
    url, model = endpoint or (server.base_url if server else "", "test-model")
    try:
        settings = AprSettings(
            base_url=url,
            model=model,
            speed_file="",
            prefer="speed",
            probe_speed=policy == "probe",
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
                    "probe_calls": sum(c["role"] == "probe" for c in result["calls"]),
                }
            )
        return rows
    finally:
        if server is not None:
            server.stop()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5, help="three-part tasks after the story")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the runs")
    parser.add_argument("--base-url", help="a real endpoint instead of the simulated servers")
    parser.add_argument("--model", default="default", help="its model name")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"tasks": args.tasks, "part_words": PART_WORDS, "runs": {}}
    lines = [
        "| server | policy | decisions (story, then the three-part tasks) | three-part wall s |",
        "|---|---|---|---|",
    ]
    endpoint = (args.base_url, args.model) if args.base_url else None
    for kind in [args.base_url] if endpoint else SERVERS:
        for policy in ("learn", "probe") if endpoint else ("one-stream", "learn", "probe"):
            rows = await sequence(kind, policy, args.tasks, endpoint)
            results["runs"][f"{kind}/{policy}"] = rows
            said = ", ".join(f"{r['choice']} ({r['by']})" for r in rows)
            wall = sum(r["wall_s"] for r in rows if r["task"] != "story")
            lines.append(f"| {kind} | {policy} | {said} | {wall:.2f} |")
            print(lines[-1], flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
