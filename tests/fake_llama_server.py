"""A stand-in for llama.cpp's ``llama-server`` (or, with ``--serial``, llama-cpp-python's server).

Run by the local-backend tests as the ``llama-server`` on PATH: it takes the real command
line (``-m``, ``--host``, ``--port``, ``--parallel``, ``-c``, ``--alias``), serves the scripted
server with the llama.cpp personality on that port, and writes its command line and process id
to ``$FAKE_LLAMA_RECORD`` so a test can check what apr asked for and that the process is gone.
``$FAKE_LLAMA_CRASH`` makes it die of SIGSEGV: ``run`` on the run's first request (its
start-up "Say OK." is answered), ``amx`` on any request unless started with ``--no-repack`` (a
native build on a VM that refuses AMX), ``amx-load`` the same while loading the model (before
it answers at all), ``always`` on any request.
No model is loaded: a planner that splits three questions, threads that stream their answers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

from apr_graph.testing import LlamaCpp, RecordedRequest, Reply, Rule, ScriptedServer
from apr_graph.testing.handler import LoopbackHTTPServer, ScriptedHandler

__all__ = ["ANSWERS", "main"]

ANSWERS = {"17*23": "391", "2**12": "4096", "99+1": "100"}
"""The three parts of the scripted task and their answers."""


class _Handler(ScriptedHandler):
    # Like llama.cpp: no Nagle, or every reply waits 40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True


class _OnPort(LoopbackHTTPServer):
    """The scripted server's HTTP server, bound to the port apr chose instead of a free one."""

    def __init__(self, scripted: ScriptedServer, host: str, port: int) -> None:
        self.scripted = scripted
        ThreadingHTTPServer.__init__(self, (host, port), _Handler)


def _worker(request: RecordedRequest) -> Reply:
    goal = next(g for g in ANSWERS if g in request.last_user_message)
    # Streamed word by word, so threads on parallel slots generate side by side.
    return Reply(content=f"the result is {ANSWERS[goal]}", chunk_delay_s=0.05)


def _count(request: RecordedRequest) -> Reply:
    # A timed request (apr calibrate, the speed probe): counting, as long as it is allowed.
    allowed = int((request.body or {}).get("max_tokens") or 16)
    return Reply(content=" ".join(str(n) for n in range(1, allowed + 1)), chunk_delay_s=0.005)


def _crash(request: RecordedRequest) -> Reply:
    # As llama.cpp does on a CPU path this machine refuses (AMX in a sandbox): SIGSEGV.
    os.kill(os.getpid(), signal.SIGSEGV)
    raise AssertionError("unreachable")


def _rules(no_repack: bool) -> list[Rule]:
    crash = os.environ.get("FAKE_LLAMA_CRASH", "")
    if crash == "run":
        return [Rule(role="warmup", reply=Reply(content="OK")), Rule(reply=_crash)]
    if crash == "always" or (crash == "amx" and not no_repack):
        return [Rule(reply=_crash)]
    plan = {
        "strategy": "parallel",
        "subtasks": [{"id": f"s{i}", "goal": goal} for i, goal in enumerate(ANSWERS, 1)],
    }
    joined = " ".join(f"({i}) {value}" for i, value in enumerate(ANSWERS.values(), 1))
    return [
        Rule(role="planner", reply=Reply(content=plan)),
        Rule(role="worker", reply=_worker),
        Rule(role="synthesizer", reply=Reply(content=joined)),
        Rule(role="warmup", reply=Reply(content="OK")),
        Rule(role="probe", reply=_count),
        # apr calibrate's latency and prefill requests ("Note ...: Say OK.")
        Rule(where=lambda r: r.role is None, reply=Reply(content="OK")),
    ]


def main(argv: list[str]) -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("-c", type=int, default=4096)
    parser.add_argument("--alias", default="model")
    parser.add_argument("--serial", action="store_true", help="llama-cpp-python: no /props")
    args, _ = parser.parse_known_args(argv)
    record = os.environ.get("FAKE_LLAMA_RECORD")
    if record:
        Path(record).write_text(json.dumps({"argv": argv, "pid": os.getpid()}))
    if os.environ.get("FAKE_LLAMA_CRASH") == "amx-load" and "--no-repack" not in argv:
        os.kill(os.getpid(), signal.SIGSEGV)  # repacking the weights for AMX, at load
    personality = None
    if not args.serial:
        personality = LlamaCpp(
            n_ctx=args.c // args.parallel, total_slots=args.parallel, model_path=args.model
        )
    server = ScriptedServer(
        _rules("--no-repack" in argv), models=[args.alias], personality=personality
    )
    httpd = _OnPort(server, args.host, args.port)
    server._httpd = httpd  # the scripted server binds a free port; apr chose this one
    httpd.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
