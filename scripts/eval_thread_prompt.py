"""A GSM8K *train* problem answered as one thread of a three-problem task, against the same
problem answered by one plain call (development material, never the held-out test items).

Not a test: it needs a running model server and takes minutes on a CPU.

    python scripts/eval_thread_prompt.py --base-url http://127.0.0.1:8090/v1 --model qwen \\
        --gsm8k /work/.mirror/openai+grade-school-math/repo --out /tmp/threads.json

The problems are ``eval_direct_prompt.py``'s single problems (seed 16). Each is put in a task
of three labelled problems, "(1) ... (2) ... (3) ...", with two others of the sample (seed 5),
at position 1, 2 or 3 in turn, and answered with the request a thread of a ``concat`` plan
sends (``prompts.worker_messages``: the run's shared system message, then the problem as the
thread's goal). The plain call is ``prompts.direct_messages`` on the problem alone. Both at
temperature 0; scored by ``eval_direct_prompt.score``.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
from eval_direct_prompt import complete, score, server_parser, tasks

from apr_graph.plan import labelled_parts
from apr_graph.prompts import direct_messages, shared_system, worker_messages
from apr_graph.state import SubtaskRecord


def label_subtask(task: str, label: str) -> SubtaskRecord:
    """The subtask a plan by labels gives the thread of part ``label`` of ``task``."""
    return {
        "id": f"s{label}",
        "goal": f"({label}) {labelled_parts(task)[label]}",
        "depends_on": [],
        "fork": False,
        "max_tokens": None,
    }


def thread_request(problem: str, others: list[str], position: int) -> list[dict[str, str]]:
    """The messages of the thread that solves ``problem`` within a three-problem task."""
    problems = [*others]
    problems.insert(position, problem)
    task = "Solve these three independent problems. Give each answer as a number.\n" + "\n".join(
        f"({i}) {p}" for i, p in enumerate(problems, 1)
    )
    subtask = label_subtask(task, str(position + 1))
    system = shared_system(task, "", merge="concat")
    return worker_messages(task, "", "concat", subtask, system=system)


async def main() -> None:
    parser = server_parser(__doc__)
    parser.add_argument("--single", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=3)
    args = parser.parse_args()
    if args.single < 3:
        parser.error("--single must be at least 3 (each problem is put beside two others)")
    singles = [t for t in tasks(args.gsm8k, 8, args.single) if len(t["answers"]) == 1]
    rng = random.Random(5)
    jobs = []
    for index, task in enumerate(singles):
        others = [o["prompt"] for o in rng.sample([s for s in singles if s is not task], 2)]
        jobs.append((task, "thread", thread_request(task["prompt"], others, index % 3)))
        jobs.append((task, "plain", direct_messages(task["prompt"], "")))
    gate = asyncio.Semaphore(args.concurrency)
    results: list[dict[str, Any]] = []

    async def run(task: dict[str, Any], way: str, messages: list[dict[str, str]]) -> None:
        async with gate:
            text, tokens = await complete(client, args, messages, 2048)
        right = score(text, task["answers"])
        print(f"{way:6} {task['source']:30} {right}", flush=True)
        results.append(
            {
                "way": way,
                "source": task["source"],
                "right": right,
                "tokens": tokens,
                "text": text,
            }
        )
        args.out.write_text(json.dumps(results, indent=1))

    async with httpx.AsyncClient(timeout=900) as client:
        await asyncio.gather(*(run(*job) for job in jobs))
    for way in ("thread", "plain"):
        mine = [r for r in results if r["way"] == way]
        print(
            f"{way}: {sum(r['right'] for r in mine)}/{len(mine)} right, "
            f"{sum(r['tokens'] for r in mine)} tokens"
        )


if __name__ == "__main__":
    asyncio.run(main())
