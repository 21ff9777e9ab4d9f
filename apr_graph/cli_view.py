"""What ``apr ask`` shows on stderr while it runs: a live table, plain lines, or nothing."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["LiveView", "PlainView", "QuietView", "View", "make_view", "summary_line"]


def summary_line(metrics: dict[str, Any]) -> str:
    """One line on what the run cost and what parallelism saved."""
    if not metrics:
        return ""
    line = (
        f"{metrics['wall_time_s']:.2f}s wall · {metrics['model_calls']} calls · "
        f"{metrics['total_tokens']:,} tokens ({metrics['prompt_tokens']:,} prompt + "
        f"{metrics['completion_tokens']:,} generated) · critical path "
        f"{metrics['critical_path_tokens']:,} tokens"
    )
    threads = metrics.get("threads") or 0
    if threads > 1 and metrics.get("service_overlap_s", 0) > 0:
        line += (
            f" · {threads} threads, two or more generating at once for "
            f"{metrics['service_overlap_s']:.2f}s (span {metrics['thread_span_s']:.2f}s)"
        )
    elif threads > 1:
        line += f" · {threads} threads: the server ran them one at a time"
    elif threads:
        line += f" · 1 thread ({metrics['thread_span_s']:.2f}s)"
    if metrics.get("loops"):
        line += (
            f" · {metrics['loops']} repeating or copying replies stopped "
            f"({metrics.get('loop_saved_tokens', 0):,} tokens not generated)"
        )
    return line


_ANSWER_LINES = 6  # lines of the streaming answer the live view shows

_PROGRESS = {"queued": 0, "running": 1}
"""How far a row has come; every other status is an outcome (2). A row never goes back."""

_STYLES = {"done": "green", "failed": "red", "running": "yellow", "cancelled": "magenta"}
_STYLES |= dict.fromkeys(("queued", "skipped"), "dim")


class View:
    """Base view: tracks thread state from the graph's custom events; shows nothing.

    A row only moves forward (queued, running, an outcome): a thread started while the plan
    was streaming stays running when the plan arrives, and a late or repeated event does not
    undo an outcome.
    """

    def __init__(self) -> None:
        self.strategy: str | None = None
        self.decision: str | None = None
        """Why the run answers directly or forks (its top-level plan's decision)."""
        self.threads: dict[str, dict[str, Any]] = {}
        self.answer = ""
        """The answer as the merge or a direct answer streams it (``answer_token`` events)."""

    wants_tokens = False
    """Whether the view shows threads' text as it streams (``stream_tokens``)."""

    def __enter__(self) -> View:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is KeyboardInterrupt:
            self.interrupted()

    def notice(self, message: str) -> None:
        """A one-line message for the user."""

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop drawing while the user is asked something (``apr ask --review``)."""
        yield

    def on_event(self, event: dict[str, Any]) -> None:
        """Update from one custom stream event."""
        kind = event.get("event")
        if kind == "token" and event.get("id") in self.threads:
            self.threads[event["id"]]["streamed"] += 1  # a streamed piece: about a token
        elif kind in ("answer_token", "answer_retry"):
            self.answer = self.answer + event["text"] if kind == "answer_token" else ""
        elif kind == "plan":
            self.strategy = event["strategy"]
            decision = event.get("decision")
            if decision is not None and not event.get("depth"):
                self.decision = f"{decision['by']}: {decision['reason']}"
            for subtask in event.get("subtasks", []):
                # the final plan's goal (a re-asked plan may differ)
                self._row(subtask["id"])["goal"] = subtask["goal"]
        elif kind in ("thread_started", "thread_cancelled", "thread_looped", "thread_finished"):
            thread = self._row(event["id"], event.get("goal", ""))
            progress = _PROGRESS.get(thread["status"], 2)
            if kind == "thread_started" and progress < 1:
                thread.update(status="running", started=time.monotonic())
            elif kind == "thread_cancelled" and progress < 2:
                # Followed by the thread's record, if it had a worker; a thread started early
                # that the final plan dropped gets only this.
                started = thread["started"]
                thread.update(
                    status="cancelled",
                    tokens=event.get("completion_tokens") or 0,
                    elapsed=None if started is None else time.monotonic() - started,
                    error=event.get("reason"),
                )
            elif kind == "thread_looped":
                thread["looped"] = "copied its input" if event.get("copied_lines") else "looped"
            elif kind == "thread_finished":
                thread.update(
                    status=event["status"],
                    tokens=event["completion_tokens"],
                    elapsed=event["elapsed_s"],
                    answer=event.get("answer"),
                    error=event.get("error"),
                )

    def _row(self, tid: str, goal: str = "") -> dict[str, Any]:
        row = dict(
            status="queued",
            goal=goal,
            tokens=0,
            streamed=0,
            started=None,
            elapsed=None,
            answer=None,
        )
        return self.threads.setdefault(tid, row)

    def summary(self, metrics: dict[str, Any]) -> None:
        """The closing line of a finished run."""

    def interrupted(self) -> None:
        """Tell what had finished when the run was interrupted."""


class QuietView(View):
    """``--quiet``: nothing on stderr but errors."""


class PlainView(View):
    """Plain lines on stderr, for logs and pipes; ``run_notices``: print the run's ``notice``
    events (off with ``--json``)."""

    def __init__(self, *, run_notices: bool = True) -> None:
        super().__init__()
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.run_notices = run_notices

    def notice(self, message: str) -> None:
        self.console.print(message, markup=False)

    thread_lines = True
    """Whether the plan and each thread's outcome get a line (a live table shows them)."""

    def on_event(self, event: dict[str, Any]) -> None:
        super().on_event(event)
        kind = event.get("event")
        if kind == "notice" and self.run_notices:  # one line, above a live table too
            self.notice(" ".join(str(event.get("text", "")).split()))
        if kind == "answer_retry":  # a direct answer: no table row to show it in
            self.notice(
                f"apr: the answer began repeating itself after {event['at_tokens']} tokens: "
                "asked again"
            )
        if not self.thread_lines:
            return
        if kind == "plan":
            count = len(event.get("subtasks", []))
            detail = f", {count} threads" if count else ""
            why = f" ({self.decision})" if self.decision and not event.get("depth") else ""
            self.notice(f"apr: plan {event['strategy']}{detail}{why}")
        elif kind == "thread_looped":
            what = (
                f"writing out {event['copied_lines']} lines of its input again"
                if event.get("copied_lines")
                else "repeating itself"
            )
            self.notice(
                f"apr: thread {event['id']} began {what} after {event['at_tokens']} "
                f"tokens: stopped ({event['saved_tokens']} tokens not generated)"
            )
        elif kind == "thread_finished":
            self.notice(
                f"apr: thread {event['id']} {event['status']} · {event['completion_tokens']} "
                f"tokens · {event['elapsed_s']:.2f}s"
            )

    def summary(self, metrics: dict[str, Any]) -> None:
        if metrics:
            self.notice(f"apr: {summary_line(metrics)}")

    def interrupted(self) -> None:
        finished = [
            (tid, t) for tid, t in self.threads.items() if t["status"] == "done" and t.get("answer")
        ]
        if not self.threads:
            self.notice("apr: interrupted while planning")
            return
        self.notice(
            f"apr: interrupted: {len(finished)} of {len(self.threads)} threads had finished"
        )
        for tid, thread in finished:
            self.notice(f"  {tid}: {thread['answer'][:300]}")


class LiveView(PlainView):
    """A live table of the plan and its threads, redrawn on stderr."""

    thread_lines = False
    wants_tokens = True

    def __init__(self, *, run_notices: bool = True) -> None:
        super().__init__(run_notices=run_notices)
        self.started = time.monotonic()
        self.live = Live(console=self.console, get_renderable=self._render, refresh_per_second=8)

    def __enter__(self) -> View:
        self.live.start()
        return self

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.live.stop()
        try:
            yield
        finally:
            self.live.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.answer = ""  # the last frame without it: the answer is printed on stdout
        self.live.stop()
        super().__exit__(exc_type, exc, tb)

    def _render(self) -> Group:
        elapsed = time.monotonic() - self.started
        head = Text(f"apr · {elapsed:5.1f}s · ", style="bold")
        head.append(f"plan: {self.strategy}" if self.strategy else "planning ...")
        parts = [head, Text(f"  {self.decision}", style="dim")] if self.decision else [head]
        if self.answer.strip():  # its last lines, as they come
            said = [line[:100] for line in self.answer.splitlines() if line.strip()]
            tail = said[-_ANSWER_LINES:]
            parts.append(Text("\n".join(["answer so far:", *tail]), style="dim"))
        if not self.threads:
            return Group(*parts)
        table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
        for column in ("thread", "status", "tokens", "time", "goal"):
            table.add_column(column)
        for tid, thread in self.threads.items():
            status = thread.get("status", "queued")
            spent, started = thread.get("elapsed"), thread.get("started")
            if spent is None and started is not None:
                spent = time.monotonic() - started
            label = f"{status} ({thread['looped']})" if thread.get("looped") else status
            table.add_row(
                tid,
                Text(label, style=_STYLES.get(status, "")),
                str(thread.get("tokens") or thread.get("streamed") or ""),
                "" if spent is None else f"{spent:.1f}s",
                thread.get("goal", "")[:70],
            )
        return Group(*parts, table)


def make_view(*, quiet: bool, run_notices: bool = True) -> View:
    """The view for this terminal: live on a TTY, plain lines otherwise, none with --quiet;
    ``run_notices``: print the run's ``notice`` events."""
    if quiet:
        return QuietView()
    return (LiveView if sys.stderr.isatty() else PlainView)(run_notices=run_notices)
