"""The replay server's answers, asked directly (no sockets): what a vLLM-like server sends."""

from __future__ import annotations

import time
from typing import Any

from apr_graph.testing import ReplayServer
from apr_graph.testing.replay import locate
from apr_graph.testing.script import RecordedRequest

TRACE = (
    "Start.\n<Parallel>\n<Goal>\n<Outline>\n1: a\n</Outline>\n<Outline>\n2: b\n</Outline>\n"
    "</Goal>\n<Path>\n1: one two three\n</Path>\n<Path>\n2: four five\n</Path>\n<Conclusion>\n"
    "Both.\n</Conclusion>\n</Parallel>\nEnd."
)
GOAL_END = TRACE.index("</Goal>") + len("</Goal>")


def ask(server: ReplayServer, prompt: str, **body: Any) -> tuple[str, str, Any]:
    request = RecordedRequest(
        "POST", "/v1/completions", {}, {"prompt": prompt, **body}, started_at=time.time()
    )
    reply = server.reply(request)
    return reply.text(), reply.finish_reason, reply.extra.get("stop_reason") or reply.error_message


def test_the_next_thread_leaves_its_siblings_out() -> None:
    server = ReplayServer(TRACE, prompt="P:")
    text, finish, stop = ask(
        server,
        "P:" + TRACE[:GOAL_END] + "\n<Path>\n2:",
        stop=["</Path>"],
        skip_special_tokens=False,
    )
    assert (text, finish, stop) == (" four five\n", "stop", "</Path>")


def test_special_tokens_are_dropped_unless_asked_and_stops_then_never_match() -> None:
    server = ReplayServer(TRACE, prompt="P:")
    text, finish, _ = ask(server, "P:Start.\n", stop=["</Goal>"])
    assert "<Goal>" not in text
    assert text.endswith("Both.\n\n\nEnd.")
    assert finish == "stop"
    kept = ReplayServer(TRACE, prompt="P:", skip_special_tokens=False)
    assert ask(kept, "P:Start.\n", stop=["</Goal>"])[0].endswith("2: b\n</Outline>\n")


def test_max_tokens_and_stop_token_ids() -> None:
    server = ReplayServer(TRACE, prompt="P:", token_ids={"</Goal>": 7})
    text, finish, _ = ask(server, "P:", max_tokens=2, skip_special_tokens=False)
    assert (text, finish) == ("Start.\n<Parallel>", "length")
    text, finish, stop = ask(server, "P:", stop_token_ids=[7], skip_special_tokens=False)
    assert text.endswith("2: b\n</Outline>\n")
    assert (finish, stop) == ("stop", 7)


def test_a_departing_request_is_refused_with_where() -> None:
    server = ReplayServer(TRACE, prompt="P:")
    assert "does not start" in str(ask(server, "Q:")[2])
    assert "character 5" in str(ask(server, "P:StartX")[2])
    assert locate("Start.", TRACE, []) == len("Start.")
