"""Ask apr-graph one question on any OpenAI-compatible server.

    OPENAI_BASE_URL=http://localhost:8000/v1 APR_MODEL=Qwen/Qwen3-8B \\
        python examples/quickstart.py "Solve: (a) 17*23  (b) 2**12  (c) the sum of 1..100"

No server? ``apr serve`` starts the embedded demo model and prints its URL; in another
terminal: ``OPENAI_BASE_URL=<that URL> APR_MODEL=smollm2 python examples/quickstart.py``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from apr_graph import AprSettings, compile_apr_graph


async def main(task: str) -> None:
    app = compile_apr_graph(settings=AprSettings())  # reads OPENAI_BASE_URL, APR_* ...
    result = await app.ainvoke({"task": task})
    print(result["answer"])
    m = result["metrics"]
    print(
        f"[{result['plan']['strategy']}, {m['threads']} threads, {m['model_calls']} calls, "
        f"{m['wall_time_s']:.2f}s, critical path {m['critical_path_tokens']} of "
        f"{m['completion_tokens']} generated tokens]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    if not os.environ.get("OPENAI_BASE_URL"):
        sys.exit(
            "set OPENAI_BASE_URL (and APR_MODEL) to an OpenAI-compatible server, or run "
            "'apr serve' in another terminal and use the URL it prints"
        )
    asyncio.run(main(" ".join(sys.argv[1:]) or "What is 17 * 23?"))
