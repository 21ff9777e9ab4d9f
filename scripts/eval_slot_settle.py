"""What a request sent right after a stream closed mid-reply costs on llama.cpp, with and
without the client's pause (``openai_transport._SETTLE_S``).

Not a test: it times real requests on a llama.cpp server (a minute or two on 2 CPU cores).

    PYTHONPATH=. python scripts/eval_slot_settle.py --base-url http://127.0.0.1:8090/v1 \\
        --model qwen --rounds 2 --out /tmp/settle.json

Each round, for each policy in turn (``pause``: as shipped; ``none``: the pause set to 0): a
streamed request of ~1,000 prompt tokens (two source files, a fresh nonce so no earlier
cache helps) is cancelled after its first tokens, as a thread stopped for looping is, then
the same prompt is sent again, as a fresh attempt is. The second request's seconds and the
prompt tokens the server found cached are recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any
from unittest import mock

from apr_graph import AprSettings, LLMClient
from apr_graph.responses import StreamProgress

FILES = Path(__file__).resolve().parent.parent / "data" / "decision" / "files" / "fix-bugs"


async def once(client: LLMClient, policy: str) -> dict[str, Any]:
    """One cut stream, then the same prompt again; the second request's figures."""
    text = "\n".join(p.read_text() for p in sorted(FILES.glob("*.py"))[:2])
    nonce = random.getrandbits(64)
    messages = [{"role": "user", "content": f"Review {nonce:x}:\n{text}\nList the bugs."}]
    pause = None if policy == "pause" else mock.patch("apr_graph.openai_transport._SETTLE_S", 0)
    with pause or contextlib.nullcontext():
        begun = asyncio.Event()
        progress = StreamProgress(on_text=lambda piece: begun.set())
        cut = asyncio.create_task(client.chat(messages, role="worker", progress=progress))
        await begun.wait()
        await asyncio.sleep(0.5)  # a few tokens more, as a reply cut for looping has
        cut.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cut
        started = time.perf_counter()
        again = await client.chat(messages, role="worker", max_tokens=8)
    return {
        "policy": policy,
        "second_s": round(time.perf_counter() - started, 2),
        "prompt_tokens": again.prompt_tokens,
        "cached_tokens": again.cached_tokens,
    }


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = AprSettings(base_url=args.base_url, model=args.model, stop_loops=False)
    rows = []
    async with LLMClient(settings) as client:
        await client.capacity_report()  # the pause applies to llama.cpp only: say it is one
        for round_ in range(args.rounds):
            for policy in ("none", "pause") if round_ % 2 else ("pause", "none"):
                rows.append({"round": round_, **await once(client, policy)})
                print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    asyncio.run(main())
