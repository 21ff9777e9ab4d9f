"""A coding-assistant step: review several source files in parallel, merge the findings.

    OPENAI_BASE_URL=http://localhost:8000/v1 APR_MODEL=Qwen/Qwen3-8B \\
        python examples/code_review.py apr_graph/llm.py apr_graph/graph.py

No server? ``apr serve`` starts the embedded demo model and prints its URL; in another
terminal: ``OPENAI_BASE_URL=<that URL> APR_MODEL=smollm2 python examples/code_review.py``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from apr_graph import AprSettings, compile_apr_graph


def review_task(paths: list[Path]) -> tuple[str, dict[str, str]]:
    """The task (one subtask per file suits it) and the files as named documents: a thread
    whose goal names a file reads that file only."""
    names = ", ".join(p.name for p in paths)
    task = (
        f"Review each of these files on its own for bugs, risky code and unclear names: {names}. "
        "Then merge the findings into one list, most serious first, each with its file."
    )
    return task, {str(p): p.read_text() for p in paths}


async def main(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        sys.exit(
            f"usage: code_review.py FILE...  (not files: {', '.join(missing) or 'none given'})"
        )
    task, context = review_task(paths)
    app = compile_apr_graph(settings=AprSettings())
    result = await app.ainvoke({"task": task, "context": context})
    print(result["answer"])
    seconds, threads = result["metrics"]["wall_time_s"], len(result["threads"])
    decision = result["plan"]["decision"]  # why it forked or not (see README: the decision)
    how = f"{threads} reviews in parallel" if threads else f"one call: {decision['reason']}"
    print(f"[{how}, {seconds:.1f}s]", file=sys.stderr)


if __name__ == "__main__":
    if not os.environ.get("OPENAI_BASE_URL"):
        sys.exit(
            "set OPENAI_BASE_URL (and APR_MODEL) to an OpenAI-compatible server, or run "
            "'apr serve' in another terminal and use the URL it prints"
        )
    asyncio.run(main([Path(a) for a in sys.argv[1:]]))
