"""A multi-step tool workflow: look several things up in parallel, then merge.

Each thread may call the allowlisted tool (here: a small inventory) through the OpenAI tools
API; a failing lookup goes back to the model as an error message, it does not crash the run.

    OPENAI_BASE_URL=http://localhost:8000/v1 APR_MODEL=Qwen/Qwen3-8B \\
        python examples/tool_lookups.py "How many bolts, nuts and gears are in stock?"

No server? ``apr serve`` starts the embedded demo model and prints its URL; in another
terminal: ``OPENAI_BASE_URL=<that URL> APR_MODEL=smollm2 python examples/tool_lookups.py``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from langchain_core.tools import tool

from apr_graph import AprSettings, compile_apr_graph

STOCK = {"bolts": 1200, "nuts": 860, "gears": 42}


@tool
def stock_level(item: str) -> int:
    """How many units of an item are in stock (bolts, nuts, gears)."""
    return STOCK[item.strip().lower()]


async def main(question: str) -> None:
    app = compile_apr_graph(settings=AprSettings(max_tool_calls=2), tools=[stock_level])
    result = await app.ainvoke({"task": question})
    print(result["answer"])


if __name__ == "__main__":
    if not os.environ.get("OPENAI_BASE_URL"):
        sys.exit(
            "set OPENAI_BASE_URL (and APR_MODEL) to an OpenAI-compatible server, or run "
            "'apr serve' in another terminal and use the URL it prints"
        )
    asyncio.run(main(" ".join(sys.argv[1:]) or "How many bolts, nuts and gears are in stock?"))
