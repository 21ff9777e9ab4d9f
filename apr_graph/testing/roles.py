"""Which of apr-graph's calls a request is, read from the request alone.

apr-graph sends servers nothing but the OpenAI request, so a test double that answers a plan
differently from a thread tells them apart by what every request of a role carries anyway:

- ``native``: a text completion (``/v1/completions``, a ``prompt``): only native mode
  sends those;
- ``planner``: the planner's system message, or the direct answer's (a plan that brought no
  answer is answered by the planner's role). The benchmark's ``sequential`` baseline sends
  the direct answer's request (one plain call), so it is read as ``planner`` too. A direct
  answer with a context has no system message: it is the one request whose only user message
  ends with our own ``</context>`` tag (the context is quoted, so it cannot close it early);
- after the plan, every request starts with the run's shared system message, and its first
  user message says what is asked (later user messages are repairs or tool results):
  ``warmup`` (the cache warm-up's "Reply with OK."), ``synthesizer`` (a merge, and the judge
  and the verifier, which run with the synthesizer's role) or ``worker`` (a thread's subtask);
- ``probe``: a timed request of ``apr calibrate`` or the speed probe (``speed.COUNT``);
- the benchmark's other baselines (``apr_graph.bench.strategies``): ``skeleton`` by its
  system message, ``expand`` by its one user message, and its
  warm-up's "Say OK." as ``warmup``.

Anything else (e.g. an agent's own model calls) has no role: ``None``. Openings, not
contents: the task and the results are quoted after them, so no text a user or a model writes
can change a request's role. Not ``response_format`` either: in the structured-output modes
after ``json_schema`` the plan's schema title is gone, and the judge and the verifier carry
schemas too. The markers are the fixed openings of the prompts in ``apr_graph.prompts``;
``tests/test_roles.py`` renders every prompt there and checks the role it is read as, so a
reworded prompt fails that test, not the tests that route by role.
"""

from __future__ import annotations

from typing import Any

from apr_graph.local import FIRST_ANSWER
from apr_graph.speed import COUNT

__all__ = ["ROLES", "role_of", "text_of"]

ROLES = ("planner", "worker", "synthesizer", "warmup", "probe", "native", "skeleton", "expand")
"""Every role ``role_of`` can tell."""

_PLANNER = (
    "You are the planner of a parallel reasoning system.",
    "Answer the question",  # the direct answer (both kinds), and the sequential baseline
    "Solve the task step by step",  # the same for models too small to judge (the demo)
)
_SHARED = "You are one part of a parallel reasoning system."
_MERGES = (
    "All threads have finished.",  # the merge
    "These are some of the threads' results",  # a merge of a group of them, first
    "The threads proposed these candidate answers",  # the judge
    "A thread proposed this result for subtask",  # the verifier
)
_THREADS = ("Subtask ", "Results of the subtasks this one depends on:")
_WARMUPS = ("Reply with OK.", "Say OK.", FIRST_ANSWER)
_PROBE = str(COUNT[0]["content"])  # the speed probe's and calibration's timed requests
_BASELINES = {
    "Write the skeleton of an answer": "skeleton",
}


def role_of(body: dict[str, Any] | None) -> str | None:
    """The role of the request whose JSON body is ``body``, or ``None`` if it is none of
    apr-graph's (see the module's docstring for the rule)."""
    if not body:
        return None
    if isinstance(body.get("prompt"), str) and "messages" not in body:
        return "native"
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    system = next((text_of(m.get("content")) for m in messages if m.get("role") == "system"), "")
    asked = next((text_of(m.get("content")) for m in messages if m.get("role") == "user"), "")
    if system.startswith(_PLANNER):
        return "planner"
    if system.startswith(_SHARED):
        if asked in _WARMUPS:
            return "warmup"
        if asked.startswith(_MERGES):
            return "synthesizer"
        return "worker" if asked.startswith(_THREADS) else None
    for opening, role in _BASELINES.items():
        if system.startswith(opening):
            return role
    if not system and asked in _WARMUPS:
        return "warmup"
    if not system and asked == _PROBE:
        return "probe"
    if asked.endswith("\n</context>") and len(messages) <= 2:
        return "planner"  # a direct answer with a context (and own instructions, if any)
    if not system and asked.startswith("Task: ") and "\nExpand point " in asked:
        return "expand"
    return None


def text_of(content: Any) -> str:
    """The text of a message's ``content`` (a string, or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""
