"""The stream events the package emits are the ones ``apr_graph.events`` documents.

No sockets: the package's source is read, not run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import apr_graph
from apr_graph import events

PACKAGE = Path(apr_graph.__file__).parent


def emitted() -> dict[str, set[str]]:
    """Every event the package sends, with the fields it sends: ``emit("name", field=...)``
    calls (on one line or several), and dicts written with an ``"event"`` key."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _called(node) == "emit" and node.args:
                name = _text(node.args[0])
                assert name is not None, f"{path.name}:{node.lineno}: write the event's name out"
                fields = {k.arg for k in node.keywords if k.arg is not None}
                found.setdefault(name, set()).update(fields)
            elif isinstance(node, ast.Dict):
                keys = [_text(k) if k is not None else None for k in node.keys]
                if "event" in keys and (name := _text(node.values[keys.index("event")])):
                    fields = {k for k in keys if k is not None and k != "event"}
                    found.setdefault(name, set()).update(fields)
    return found


def _called(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    return call.func.attr if isinstance(call.func, ast.Attribute) else None


def _text(node: ast.expr) -> str | None:
    """The string a node writes out, if it is a string literal."""
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def documented() -> dict[str, set[str]]:
    """The events listed in the ``events`` module's docstring, with the fields each entry
    names in double quotes (an entry runs to the next item or unindented line)."""
    entry = r'^- ``\{"event": "(\w+)"(.*?)(?=^- |^\S|\Z)'
    entries = re.findall(entry, events.__doc__ or "", re.S | re.M)
    return {name: set(re.findall(r'"(\w+)"', rest)) for name, rest in entries}


def test_the_scan_finds_events_written_over_several_lines() -> None:
    # worker.py writes thread_started and thread_finished as multi-line emit( calls
    assert {"plan", "thread_started", "thread_finished", "token", "answer_token"} <= set(emitted())


def test_every_event_emitted_is_documented_with_its_fields() -> None:
    docs = documented()
    missing = sorted(set(emitted()) - set(docs))
    assert missing == [], f"events emitted but not documented in apr_graph/events.py: {missing}"
    undocumented = {
        name: sorted(fields - docs[name])
        for name, fields in emitted().items()
        if fields - docs[name]
    }
    assert undocumented == {}, f"fields emitted but not documented: {undocumented}"


def test_every_event_documented_is_emitted() -> None:
    assert sorted(set(documented()) - set(emitted())) == []
