"""Threads that start while the plan is still being written.

Once a subtask of a parallel plan (whose merge is named) is complete in the planner's stream,
its thread's request is sent. Its worker node adopts that request only if the final plan gives
it exactly the same one and it neither forks nor waits; otherwise it is cancelled. Each early
request takes its thread slot first, so ``max_total_threads`` counts early ones too.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from pydantic import ValidationError

from apr_graph.budget import Budget
from apr_graph.events import emit
from apr_graph.inputs import thread_context
from apr_graph.llm import LLMClient
from apr_graph.nodes._records import stopped_record
from apr_graph.nodes.thread import copy_watch, thread_call
from apr_graph.plan import PlanPrefix
from apr_graph.plan_schema import Subtask
from apr_graph.prompts import worker_messages
from apr_graph.responses import Completion, Message, StreamProgress
from apr_graph.settings import AprSettings
from apr_graph.state import CallRecord, PlanRecord, SubtaskRecord

__all__ = ["EarlyCall", "EarlyStarter", "PlanReader", "read_plan"]

_STRING_FIELD = re.compile(r'"(strategy|merge)"\s*:\s*"([A-Za-z_]+)"')
_SUBTASKS = re.compile(r'"subtasks"\s*:\s*\[')
_DECODER = json.JSONDecoder()


def read_plan(text: str) -> tuple[str | None, str | None, list[Any]]:
    """``(strategy, merge, subtasks)`` as far as a streamed plan has been written: only
    complete subtasks (whole JSON values); fields not written yet are ``None``."""
    return PlanReader().read(text)


class PlanReader:
    """``read_plan`` for a text that keeps growing: each subtask is decoded once. A text that
    does not begin with what was read before (the reply started over) is read afresh."""

    def __init__(self) -> None:
        self.restarts = 0
        """Times the text started over (what was read of it was dropped)."""
        self._clear()

    def _clear(self) -> None:
        self._fields: dict[str, str] = {}
        self._items: list[Any] = []
        self._text = ""  # the text as last read
        self._at: int | None = None  # where the next subtask begins, once "subtasks" is seen

    def read(self, text: str) -> tuple[str | None, str | None, list[Any]]:
        """What ``text`` holds so far; the list of subtasks returned only grows (until a
        restart), so ``items[n:]`` are those found since a call that returned ``n``."""
        if not text.startswith(self._text):
            self.restarts += 1
            self._clear()
        self._text = text
        if len(self._fields) < 2:
            for key, value in _STRING_FIELD.findall(text):
                self._fields.setdefault(key, value.lower())
        if self._at is None and (found := _SUBTASKS.search(text)):
            self._at = found.end()
        at, end = self._at, len(text)
        while at is not None and at < end:
            while at < end and text[at] in " \t\r\n,":
                at += 1
            if at >= end or text[at] == "]":
                break
            try:
                item, at = _DECODER.raw_decode(text, at)
            except json.JSONDecodeError:
                break  # the next subtask is still being written
            self._items.append(item)
            self._at = at
        return self._fields.get("strategy"), self._fields.get("merge"), self._items


class _Relay:
    """Token pieces of an early thread, held until its worker node passes them on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[str] = []
        self._sink: Callable[[str], None] | None = None

    def __call__(self, piece: str) -> None:
        with self._lock:
            if self._sink is None:
                self._held.append(piece)
                return
            sink = self._sink
        sink(piece)

    def attach(self, sink: Callable[[str], None] | None) -> None:
        with self._lock:
            self._sink = sink or (lambda _: None)
            for piece in self._held:  # under the lock, so no later piece overtakes these
                self._sink(piece)
            self._held = []


@dataclass
class EarlyCall:
    """One thread's first request, sent before the plan was finished."""

    subtask: SubtaskRecord
    messages: list[Message]
    allowance: int
    progress: StreamProgress
    started: float
    model: str
    relay: _Relay = field(default_factory=_Relay)
    handed: bool = True
    """Whether the request was handed to the client (it may have gone out): one held back
    behind the warm-up and cancelled before never was, and its thread slot can be reused."""
    cancelled: bool = False
    task: asyncio.Future[Completion] = field(init=False)

    def matches(self, messages: list[Message], allowance: int, subtask: SubtaskRecord) -> bool:
        """Whether the worker would send exactly this request (never once it was cancelled)."""
        return (
            not self.cancelled
            and allowance == self.allowance
            and messages == self.messages
            and subtask.get("temperature") == self.subtask.get("temperature")
        )

    def cancel(self, charge: Callable[[int], None]) -> CallRecord | None:
        """Cancel the request; charge what it cost; its record if it was sent. Cancelling
        again does nothing (the cost was counted the first time)."""
        self.task.cancel()
        if self.cancelled:
            return None
        self.cancelled = True
        return stopped_record(
            self.progress,
            self.messages,
            role="worker",
            model=self.model,
            mode="discarded",
            charge=charge,
            thread_id=self.subtask["id"],
        )


@dataclass(eq=False)
class EarlyStarter:
    """Watches a planner's stream (its ``progress`` goes to the planner call) and starts each
    complete, independent subtask's thread. Checks run on the caller's loop, in the node's
    context, so events reach the graph's stream. ``after``: a warm-up to send requests after.
    """

    client: LLMClient
    settings: AprSettings
    _: KW_ONLY
    early: dict[str, EarlyCall]
    system: Callable[[str | None, str | None], str]
    task: str
    context: str | Mapping[str, str]
    depth: int
    budget: Budget
    after: asyncio.Future[None] | None = None
    reserved: set[str] = field(default_factory=set, init=False)
    """Subtasks started early; each took its thread slot from the budget."""
    closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.progress = StreamProgress(on_text=self._on_text)
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.copy_context()
        self._scheduled = False
        self._seen: set[str] = set()
        self._waits: set[str] = set()  # ids that name dependencies, perhaps on unwritten ones
        self._reader = PlanReader()
        self._taken = 0  # the reader's subtasks validated so far
        self._restarts = 0
        self._plan = PlanPrefix(self.settings, depth=self.depth, task=self.task)

    def _on_text(self, _piece: str) -> None:
        if self._scheduled or self.closed:
            return
        self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._check, context=self._context)
        except RuntimeError:  # the caller's loop has closed: nothing left to start
            self.closed = True

    def _check(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        strategy, merge, items = self._reader.read(self.progress.text)
        if self._reader.restarts != self._restarts:  # the planner's reply started over
            self._restarts, self._taken, self._waits = self._reader.restarts, 0, set()
            self._plan = PlanPrefix(self.settings, depth=self.depth, task=self.task)
        merge = self.settings.merge or merge
        if strategy != "parallel" or not items or merge is None:
            return  # a thread's request depends on the merge (voters end with a final line)
        new = []
        for item in items[self._taken :]:
            try:
                written = Subtask.model_validate(
                    {"id": "", "goal": item} if isinstance(item, str) else item
                )
            except ValidationError:
                continue  # the final plan decides what becomes of it
            new.append(written)
            if written.depends_on:
                self._waits.add(written.id.strip())
        self._taken = len(items)
        record = self._plan.extend(merge, new, slots=self.slots())
        if record["strategy"] != "parallel":
            return
        for subtask in record["subtasks"]:
            if subtask["id"] in self._seen:
                continue
            self._seen.add(subtask["id"])
            waiting = subtask["depends_on"] or subtask["id"] in self._waits
            if waiting or subtask["fork"] or not self.budget.admits():
                continue
            if self.budget.reserve_threads(1):
                self.reserved.add(subtask["id"])
                self._start(record, subtask)

    def slots(self) -> int:
        """Threads this run may still start: what the budget has left plus what it took."""
        left = self.settings.max_total_threads - self.budget.threads_started
        return left + len(self.reserved)

    def settle(self, plan: PlanRecord, system: str | None, calls: list[CallRecord]) -> set[str]:
        """Once ``plan`` is final, keep each early thread whose request it leaves unchanged
        (for its worker node to adopt), cancel the others (records to ``calls``); returns the
        subtasks whose thread slot is taken already (an unsent request gives its slot back)."""
        self.closed = True
        subtasks = {s["id"]: s for s in plan["subtasks"]}
        held: set[str] = set()
        for sid, call in self.early.items():
            subtask = subtasks.get(sid)
            if (
                subtask is not None
                and not subtask["fork"]
                and not subtask["depends_on"]  # its request will carry the results it needs
                and call.matches(
                    self._messages(plan["merge"], subtask, system)[0],
                    subtask["max_tokens"] or self.settings.worker_max_tokens,
                    subtask,
                )
            ):
                held.add(sid)
                continue
            if (record := call.cancel(self.budget.charge)) is not None:
                calls.append(record)
            if not call.handed:
                self.budget.release_threads(1)
            elif subtask is not None and subtask["fork"]:
                held.add(sid)  # its slot is the fork's
        return held

    def _messages(
        self, merge: str | None, subtask: SubtaskRecord, system: str | None = None
    ) -> tuple[list[Message], list[str] | None]:
        """The thread's request as its worker node would send it, and the names of its
        documents when it reads a part of them; ``system``: the shared system message."""
        context, documents = thread_context(
            self.context, subtask["goal"], self.settings.thread_documents
        )
        if documents is not None or system is None:
            system = self.system(merge, None if documents is None else context)
        return worker_messages(self.task, context, merge, subtask, system=system), documents

    def _start(self, plan: PlanRecord, subtask: SubtaskRecord) -> None:
        messages, documents = self._messages(plan["merge"], subtask)
        relay = _Relay()
        call = EarlyCall(
            subtask,
            messages,
            subtask["max_tokens"] or self.settings.worker_max_tokens,
            StreamProgress(on_text=relay if self.settings.stream_tokens else None),
            time.time(),
            self.settings.model_for("worker"),
            relay,
            handed=self.after is None,
        )
        call.task = self.client.start(self._send(call))
        # A discarded request's outcome is marked seen (asyncio would log it otherwise).
        call.task.add_done_callback(lambda task: task.cancelled() or task.exception())
        self.early[subtask["id"]] = call
        emit(
            "thread_started",
            id=subtask["id"],
            goal=subtask["goal"],
            at=call.started,
            depth=self.depth + 1,
            early=True,
            **({} if documents is None else {"documents": documents}),
        )

    async def _send(self, call: EarlyCall) -> Completion:
        """Send the request now, or once ``after`` (the warm-up of the shared prefix) is done."""
        if self.after is not None:
            await asyncio.shield(self.after)
            call.handed = True
        return await thread_call(
            self.client,
            call.messages,
            call.subtask,
            call.allowance,
            call.progress,
            self.budget,
            copy_lines=copy_watch(self.settings, self.task, call.subtask["goal"]),
        )
