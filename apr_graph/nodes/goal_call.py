"""A subtask whose goal is a call of one of the threads' tools is run without the model.

A goal such as ``multiply(17, 23)`` or ``lookup(country="Kenya")`` is parsed, never evaluated:
only a call of an allowlisted tool whose arguments are literals (a bare word is text) qualifies,
and positional arguments take the tool's parameters in order. Its result is the thread's
answer; if the call fails, the thread asks the model as usual.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

__all__ = ["goal_call"]

_MAX_GOAL_CHARS = 500


def goal_call(goal: str, tools: Sequence[BaseTool]) -> dict[str, str] | None:
    """``{"name", "arguments"}`` (arguments as JSON) if ``goal`` is a call of one of ``tools``."""
    text = goal.strip().rstrip(".;")
    if not tools or not text or len(text) > _MAX_GOAL_CHARS:
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        return None
    tool = {tool.name: tool for tool in tools}.get(tree.func.id)
    if tool is None or len(tree.args) > len(tool.args):
        return None
    params = list(tool.args)
    try:
        arguments = {name: _literal(node) for name, node in zip(params, tree.args, strict=False)}
        for keyword in tree.keywords:
            if keyword.arg is None or keyword.arg not in params or keyword.arg in arguments:
                return None
            arguments[keyword.arg] = _literal(keyword.value)
    except ValueError:
        return None
    return {"name": tool.name, "arguments": json.dumps(arguments)}


def _literal(node: ast.expr) -> Any:
    """A literal's value; a bare name (``bolts``) is its text. Anything else is refused."""
    if isinstance(node, ast.Name):
        return node.id
    return ast.literal_eval(node)  # ValueError for anything that is not a literal
