"""A three-file task of our own, answered by one plain call and by apr-graph forced to fork
(``prefer="quality"``), each side from a cold server, in one process.

Not a test: it needs a running model server and takes a minute or more on a CPU.

    python scripts/eval_document_map.py --base-url http://127.0.0.1:8090/v1 --model qwen \\
        --task 1 --restart "bash restart-llama-server.sh" [--planner]

``--task``: an index into ``eval_thread_length.DOCUMENT_TASKS`` (never an issue's or the
bench's tasks). ``--planner`` turns ``plan_documents`` off, so the model plans the task.
``--restart``: a shell command run before each side, so that neither finds its prompt cached.
Prints one JSON line: both walls, the plain call's tokens, the threads' tokens and loops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from typing import Any

import httpx
from eval_thread_length import DOCUMENT_TASKS

from apr_graph import AprSettings, compile_apr_graph
from apr_graph.inputs import render_context


async def plain(args: argparse.Namespace, item: dict[str, Any]) -> tuple[float, int]:
    """One plain call: the task and the files in one user message, as a user would send."""
    content = item["task"] + "\n\n" + render_context(item["context"])
    body = {
        "model": args.model,
        "temperature": 0,
        "max_tokens": 2048,
        "messages": [{"role": "user", "content": content}],
    }
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=900) as client:
        reply = (await client.post(f"{args.base_url}/chat/completions", json=body)).json()
    return time.perf_counter() - started, int(reply["usage"]["completion_tokens"])


async def forked(args: argparse.Namespace, item: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    settings = AprSettings(
        base_url=args.base_url,
        model=args.model,
        prefer="quality",
        learn_speed=False,
        plan_documents=not args.planner,
    )
    app = compile_apr_graph(settings=settings)
    started = time.perf_counter()
    result = await app.ainvoke({"task": item["task"], "context": item["context"]})
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", type=int, default=1)
    parser.add_argument("--planner", action="store_true", help="plan_documents off")
    parser.add_argument("--restart", default="", help="shell command run before each side")
    args = parser.parse_args()
    item = DOCUMENT_TASKS[args.task]
    if args.restart:
        subprocess.run(args.restart, shell=True, check=True)
    plain_s, plain_tokens = asyncio.run(plain(args, item))
    if args.restart:
        subprocess.run(args.restart, shell=True, check=True)
    apr_s, result = asyncio.run(forked(args, item))
    threads = [
        {"id": t["id"], "tokens": t["completion_tokens"], "looped": bool(t.get("looped"))}
        for t in result["threads"]
    ]
    print(
        json.dumps(
            {
                "task": item["task"],
                "planner": args.planner,
                "plain_s": round(plain_s, 1),
                "plain_tokens": plain_tokens,
                "apr_s": round(apr_s, 1),
                "x_plain": round(apr_s / plain_s, 2),
                "notes": result["plan"]["notes"],
                "threads": threads,
            }
        )
    )


if __name__ == "__main__":
    main()
