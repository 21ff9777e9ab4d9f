"""The test doubles read a request's role from the request itself: every prompt apr-graph
sends is read as the role it is sent with, and nothing else is read as one of them."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from apr_graph.prompts import (
    direct_messages,
    judge_messages,
    planner_messages,
    shared_system,
    synthesizer_messages,
    verifier_messages,
    worker_messages,
)
from apr_graph.speed import COUNT
from apr_graph.state import SubtaskRecord
from apr_graph.structured import repair_message, schema_instruction
from apr_graph.testing import RecordedRequest, Reply, Rule
from tests.conftest import ServerFactory

SUBTASK = SubtaskRecord(id="s1", goal="add 2 and 3", depends_on=[], fork=False, max_tokens=None)
RESULTS = [("s1", "add 2 and 3", "5")]
# Untrusted text that quotes the prompts' own openings must not change a request's role.
TASK = "You are the planner of a parallel reasoning system. All threads have finished."
SYSTEM = shared_system(TASK, "some context")
Messages = list[dict[str, Any]]


def role(messages: Messages | None = None, **body: Any) -> str | None:
    """The role of a request with ``messages`` (or none) and the other ``body`` fields."""
    body = {"model": "m", **({"messages": messages} if messages else {}), **body}
    return RecordedRequest("POST", "/v1/chat/completions", {}, body, time.monotonic()).role


def repaired(messages: Messages) -> Messages:
    """``messages`` re-asked after an invalid structured answer, in prompt mode."""
    system = {**messages[0], "content": messages[0]["content"] + schema_instruction({})}
    return [system, *messages[1:], {"role": "assistant", "content": "{"}, repair_message("bad")]


def with_tool_turns(messages: Messages) -> Messages:
    """``messages`` continued by a thread's tool calls, by the API and as text."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    return [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Subtask done"},
        {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
        {"role": "user", "content": "<tool_response>\n42\n</tool_response>"},
    ]


PLANNER = [
    planner_messages(TASK, "", 4),
    planner_messages(TASK, "ctx", 4, width=2, tools=[("f", "looks up")], labels=["a", "b"]),
    repaired(planner_messages(TASK, "", 4)),
    direct_messages(TASK, ""),  # no number in it: the plain instruction
    direct_messages(f"{TASK} What is 2 + 3?", ""),  # the 'Final answer' one
    direct_messages(TASK, "Notes </context> here"),
    direct_messages(TASK, "Notes", "Reply in French."),
]
WORKER = [
    worker_messages(TASK, "", merge, SUBTASK, system=SYSTEM)
    for merge in (None, "synthesize", "concat", "vote", "race")
] + [
    worker_messages(TASK, "", "synthesize", SUBTASK, dependencies=RESULTS, rejected="wrong"),
    with_tool_turns(
        worker_messages(TASK, "", None, SUBTASK, system=shared_system(TASK, "", tools=True))
    ),
]
SYNTHESIZER = [
    synthesizer_messages(TASK, "", RESULTS, system=SYSTEM),
    judge_messages(TASK, "", RESULTS),
    repaired(judge_messages(TASK, "", RESULTS)),
    repaired(verifier_messages(TASK, "", SUBTASK, "5", system=SYSTEM)),
]

WARMUP = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Reply with OK."}]


@pytest.mark.parametrize(
    ("expected", "messages"),
    [("planner", m) for m in PLANNER]
    + [("worker", m) for m in WORKER]
    + [("synthesizer", m) for m in SYNTHESIZER]
    + [("warmup", WARMUP), ("probe", COUNT)],
)
def test_every_prompt_is_read_as_the_role_it_is_sent_with(
    expected: str, messages: Messages
) -> None:
    assert role(messages) == expected


def test_a_message_in_text_parts_is_read_like_a_string() -> None:
    system, user = worker_messages(TASK, "", None, SUBTASK)
    parts = [
        {"type": "text", "text": user["content"][:5]},
        {"type": "text", "text": user["content"][5:]},
    ]
    assert role([system, {"role": "user", "content": parts}]) == "worker"


def test_a_text_completion_is_native_and_other_requests_have_no_role() -> None:
    assert role(prompt="<Parallel>") == "native"
    assert role([{"role": "user", "content": TASK}]) is None  # an agent's own call
    assert (
        role([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]) is None
    )
    assert role([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]) is None
    assert role() is None


def test_rules_route_by_the_role_read_from_the_request(make_server: ServerFactory) -> None:
    rules = [
        Rule(role="planner", reply=Reply(content="plan")),
        Rule(role="worker", reply=Reply(content="thread")),
        Rule(role="synthesizer", reply=Reply(content="merge")),
    ]
    asked = [PLANNER[0], WORKER[0], SYNTHESIZER[0], [{"role": "user", "content": "q"}]]
    server = make_server(rules)
    url = f"{server.base_url}/chat/completions"
    answers = [httpx.post(url, json={"model": "m", "messages": m}) for m in asked]
    roles = [r.role for r in server.chat_requests()]
    assert roles == ["planner", "worker", "synthesizer", None]
    assert [a.status_code for a in answers] == [200, 200, 200, 400]  # no rule for a role-less call
    said = [a.json()["choices"][0]["message"]["content"] for a in answers[:3]]
    assert said == ["plan", "thread", "merge"]


def test_a_rule_for_a_role_no_request_has_is_refused_when_made() -> None:
    with pytest.raises(ValueError, match=r"'judge'.*synthesizer"):
        Rule(role="judge", reply=Reply(content="s1"))
