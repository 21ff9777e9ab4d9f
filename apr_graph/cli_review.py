"""``apr ask --review``: the plan is shown, and its threads run only once the user says so.

The run pauses at the graph's ``review`` node (``AprSettings.review_plan``); the reply is read
on standard input, so it may be typed or piped: ``y`` (or an empty line) runs the plan, ``n``
stops with nothing run, ``e`` asks for the goals to run instead, one per line.
"""

from __future__ import annotations

import sys
from typing import Any

from apr_graph.cli_common import EXIT_INTERRUPTED, EXIT_USAGE, CliError
from apr_graph.cli_view import View

__all__ = ["review_reply"]


_REPLIES = frozenset({"", "y", "yes", "n", "no", "e", "edit"})


def _read(prompt: str) -> str:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise CliError("standard input ended before the plan review was answered", EXIT_USAGE)
    if not sys.stdin.isatty():  # piped: say what was read, as a terminal would have shown it
        sys.stderr.write(line if line.endswith("\n") else f"{line}\n")
    return line.strip()


def review_reply(view: View, ask: dict[str, Any], stored: str | None = None) -> bool | list[str]:
    """The reply to a paused plan review (``ask``: its task, plan and any ``error``): ``True``
    to run the plan, or the goals to run instead. ``stored``: the id the run is kept under
    (a declined run waits there).

    Raises:
        CliError: the user declined (exit 130: nothing more runs), or stdin ended.
    """
    plan = ask["plan"]
    count = len(plan["subtasks"])
    lines = [f"apr: the plan: {count} thread{'s' if count != 1 else ''}, merge {plan['merge']}"]
    lines += [f"  {s['id']}: {s['goal']}" for s in plan["subtasks"]]
    if ask.get("error"):
        lines.append(f"apr: {ask['error']}")
    with view.paused():
        print("\n".join(lines), file=sys.stderr)
        answer = None
        while answer not in _REPLIES:  # anything else is asked again
            answer = _read("Run it? [Y]es, [n]o, [e]dit the goals: ").lower()
        if answer in ("n", "no"):
            waits = f" (it waits: 'apr resume {stored}' shows it again)" if stored else ""
            raise CliError(f"the plan was not approved: no thread was run{waits}", EXIT_INTERRUPTED)
        if answer in ("e", "edit"):
            goals: list[str] = []
            while goal := _read(f"goal {len(goals) + 1} (an empty line ends): "):
                goals.append(goal)
            return goals
    return True
