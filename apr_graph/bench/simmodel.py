"""The scripted "model" behind the simulated server: right answers, realistic lengths.

The simulated server measures orchestration, not intelligence, so its model knows every
task's answer. What it models is how long the answers are: solving one part of a task takes
``reasoning`` tokens, so a sequential chain of thought over k parts writes k times as much as
one thread does, while a plan and a merge are short. Roles are read from each request
(``RecordedRequest.role``, by the rule in ``apr_graph.testing.roles``, which also knows the
benchmark's baselines ``sequential``, ``skeleton`` and ``expand`` and its warm-up).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from apr_graph.bench.suites import Task
from apr_graph.testing import RecordedRequest, Reply

__all__ = ["SimModel"]


def _goal_labels(request: RecordedRequest) -> list[str]:
    """The labels a plan's goals must be, if the request's JSON schema says so."""
    try:
        schema = (request.body or {})["response_format"]["json_schema"]["schema"]
        items = schema["anyOf"][1]["properties"]["subtasks"]["items"]
    except (KeyError, IndexError, TypeError):
        return []
    labels = items.get("enum") if isinstance(items, dict) else None
    return [str(label) for label in labels] if isinstance(labels, list) else []


@dataclass
class SimModel:
    """Replies for the tasks it was given, by role."""

    tasks: list[Task]
    reasoning: int = 100
    """Tokens of reasoning per part of a task (a chain of thought spends 100-300 on one
    arithmetic sub-question; 100 is on the short side)."""

    def __call__(self, request: RecordedRequest) -> Reply:
        role = request.role or "sequential"
        if role == "warmup":
            return Reply(content="OK")
        task = self._task(request)
        handler = {
            "planner": self._plan,
            "worker": self._thread,
            "synthesizer": self._merge,
            "sequential": self._sequential,
            "skeleton": self._skeleton,
            "expand": self._expand,
            "native": self._native,
        }.get(role)
        if task is None and role in {"sequential", "probe"}:
            # Not one of its tasks: a calibration's or the speed probe's request, which asks
            # it to count (or say OK) for as long as it is allowed.
            allowed = int((request.body or {}).get("max_tokens") or 64)
            return Reply(content=" ".join(str(n) for n in range(1, allowed + 1)))
        if task is None or handler is None:
            return Reply(status=400, error_message=f"SimModel: unknown task or role {role!r}")
        return handler(task, request)

    def _task(self, request: RecordedRequest) -> Task | None:
        text = request.all_text
        matches = [t for t in self.tasks if t.prompt in text]
        return max(matches, key=lambda t: len(t.prompt)) if matches else None

    def _think(self, parts: int) -> str:
        # Every word its own, as reasoning moves on (one word said over and over is a loop,
        # which apr-graph stops: ``apr_graph.loops``), and without digits (graders read them).
        return " ".join(f"step{_letters(i)}" for i in range(self.reasoning * parts))

    def _final(self, task: Task) -> str:
        if task.suite == "countdown":
            return str(task.meta["solution"])
        labels = task.meta.get("labels") or [""]
        return " ".join(
            f"({label}) {value}" if label else value
            for label, value in zip(labels, task.expected, strict=False)
        )

    def _plan(self, task: Task, request: RecordedRequest) -> Reply:
        if not request.system_message.startswith("You are the planner"):
            # A direct answer (the router or the speed decision skipped the plan): it
            # reasons as a sequential answer does.
            return self._sequential(task, request)
        if task.suite == "control":
            # A direct answer reasons as much as a sequential one (in its working, as the
            # schema asks) and states its result once, as a sequential answer does: the plan
            # costs only its JSON.
            plan = {"strategy": "direct", "working": self._think(1), "answer": task.expected[0]}
            return Reply(content=plan)
        labels = _goal_labels(request)
        if labels and task.suite in {"arithmetic", "multipart"}:
            goals = labels[: len(task.parts)]  # the schema lets a goal be its part's label only
        elif task.suite == "arithmetic":
            goals = [f"Compute {p}" for p in task.parts]
        elif task.suite == "multipart":
            goals = list(task.parts)  # each part is a question of its own
        else:
            goals = [f"Find an expression for {task.meta['target']}, {p}" for p in task.parts]
        # As the planner prompt asks: the merge before the subtasks, each subtask written as
        # its goal alone, and "concat" for a list of separate questions.
        merge = "synthesize" if task.suite == "countdown" else "concat"
        return Reply(content={"strategy": "parallel", "merge": merge, "subtasks": goals})

    def _thread(self, task: Task, request: RecordedRequest) -> Reply:
        goal = request.last_user_message
        if task.suite == "countdown":
            found = re.search(r"start from (\d+)", goal)
            if found and int(found.group(1)) == task.meta["first"]:
                result = f"Final answer: {task.meta['solution']}"
            else:
                result = "No expression found from this start."
            return Reply(content=f"{self._think(1)} {result}")
        for part, value in zip(task.parts, task.expected, strict=True):
            if part in goal:
                return Reply(content=f"{self._think(1)} Result: {value}")
        return Reply(content=f"{self._think(1)} Result: {task.expected[0]}")

    def _merge(self, task: Task, request: RecordedRequest) -> Reply:
        return Reply(content=self._final(task))

    def _sequential(self, task: Task, request: RecordedRequest) -> Reply:
        return Reply(content=f"{self._think(len(task.parts))} Final answer: {self._final(task)}")

    def _native(self, task: Task, request: RecordedRequest) -> Reply:
        """A ThreadWeaver-style model: outlines, then one thread per part, then the answer."""
        prompt = request.prompt
        if prompt.rstrip().endswith("</Thread>"):
            return Reply(content=f"</Parallel>\nFinal answer: {self._final(task)}")
        found = re.search(r"<Thread>\n(\d+):$", prompt)
        if found:
            part = task.parts[int(found.group(1)) - 1]
            result = (
                f"Final answer: {task.meta['solution']}"
                if task.suite == "countdown" and part == f"start from {task.meta['first']}"
                else self._thread_result(task, part)
            )
            return Reply(content=f" {self._think(1)} {result}</Thread>")
        if task.suite == "control":
            return Reply(content=f"{self._think(1)} Final answer: {task.expected[0]}")
        outlines = "\n".join(f"<Outline>{i + 1}: {p}</Outline>" for i, p in enumerate(task.parts))
        return Reply(content=f"<Parallel>\n<Outlines>\n{outlines}\n</Outlines>")

    def _thread_result(self, task: Task, part: str) -> str:
        if task.suite == "countdown":
            return "No expression found from this start."
        return f"Result: {task.expected[task.parts.index(part)]}"

    def _skeleton(self, task: Task, request: RecordedRequest) -> Reply:
        found = re.search(r"exactly (\d+) points", request.all_text)
        count = int(found.group(1)) if found else 4
        points = [f"point {i + 1}" for i in range(count)]
        return Reply(content=json.dumps({"points": points}))

    def _expand(self, task: Task, request: RecordedRequest) -> Reply:
        # A fixed split ignores the task's shape: each point re-derives its share of parts.
        found = re.search(r"point (\d+) of (\d+)", request.last_user_message)
        index, count = (int(found.group(1)), int(found.group(2))) if found else (1, 1)
        share = max(1, -(-len(task.parts) // count))
        answer = self._final(task) if index == count else ""
        return Reply(content=f"{self._think(share)} {answer}".strip())


def _letters(number: int) -> str:
    """``number`` written in the letters a-z (0 -> "a", 26 -> "ba")."""
    digits = ""
    while True:
        number, rest = divmod(number, 26)
        digits = chr(ord("a") + rest) + digits
        if not number:
            return digits
