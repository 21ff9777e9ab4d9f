"""The server of the overhead measurement, run in a process of its own so that the CPU time
measured is the client's alone. It imports only the scripted test server and the plan's
types, so the process is up in a fraction of a second."""

from __future__ import annotations

import re
import time

from apr_graph.state import SubtaskRecord
from apr_graph.testing import RecordedRequest, Reply, Rule, ScriptedServer

__all__ = ["CHUNKS", "REPLY_S", "TASK", "serve_forever", "subtask"]

CHUNKS = 5
CHUNK_S = 0.1
REPLY_S = CHUNKS * CHUNK_S
TASK = "fan out {n}"


def _plan(request: RecordedRequest) -> Reply:
    found = re.search(r"fan out (\d+)", request.all_text)
    count = int(found.group(1)) if found else 1
    return Reply(
        content={
            "strategy": "parallel",
            "merge": "synthesize",
            "subtasks": [subtask(i) for i in range(count)],
        }
    )


def subtask(index: int) -> SubtaskRecord:
    """The ``index``-th subtask of the fan-out."""
    return SubtaskRecord(
        id=f"s{index}", goal=f"part {index}", depends_on=[], fork=False, max_tokens=None
    )


def serve_forever(reply_s: float = REPLY_S) -> None:
    """The overhead server (run in its own process): prints its URL, serves until killed.
    Worker replies stream ``CHUNKS`` chunks over ``reply_s`` seconds."""
    slow = Reply(content=" ".join(["ok"] * CHUNKS), chunk_delay_s=reply_s / CHUNKS)
    rules = [
        Rule(role="planner", reply=_plan),
        Rule(role="synthesizer", reply=Reply(content="merged")),
        Rule(reply=slow),
    ]
    server = ScriptedServer(rules).start()
    server.requests = _Discard()  # keep no history: 1,000-thread runs would pile it up
    print(server.base_url, flush=True)
    while True:
        time.sleep(3600)


class _Discard(list[RecordedRequest]):
    def append(self, item: RecordedRequest) -> None:
        return None
