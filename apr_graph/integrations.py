"""apr-graph as a LangChain tool (``as_tool``) and as a LangGraph Server graph (``make_graph``).

As a subgraph, the compiled graph is a node of your own graph as it is: its input and output
schemas only touch their keys, and its events stream with ``subgraphs=True``.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, Field

from apr_graph.graph import App, compile_apr_graph
from apr_graph.llm import LLMClient
from apr_graph.settings import AprSettings

__all__ = ["AprToolInput", "as_tool", "make_graph"]

DEFAULT_DESCRIPTION = (
    "Solve a hard question that has several independent parts (sub-questions, items to "
    "examine, approaches to compare): it is split into parallel threads whose results are "
    "merged. Give the complete question; add any facts the threads need as context."
)


class AprToolInput(BaseModel):
    """Arguments of the apr-graph tool."""

    task: str = Field(description="The complete question or task, self-contained.")
    context: str | dict[str, str] = Field(
        default="",
        description="Facts or material the threads may need: text, or named documents "
        '(e.g. files: {"calc.py": "<its text>", ...}), of which each thread reads the ones '
        "its part names.",
    )


def _content_and_artifact(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    record = {key: result.get(key) for key in ("plan", "threads", "metrics")}
    return str(result.get("answer", "")), record


def as_tool(
    app: App | None = None,
    *,
    settings: AprSettings | None = None,
    client: LLMClient | None = None,
    name: str = "parallel_reasoning",
    description: str = DEFAULT_DESCRIPTION,
) -> BaseTool:
    """A LangChain tool that runs apr-graph; ``content`` is the answer, ``artifact`` the run.

    Args:
        app: a compiled apr graph; built from ``settings`` / ``client`` if omitted.
        name / description: what the agent sees.

    Example:
        >>> from langchain.agents import create_agent  # doctest: +SKIP
        >>> agent = create_agent(model, tools=[as_tool(settings=settings)])  # doctest: +SKIP
    """
    graph = app or compile_apr_graph(settings=settings, client=client)

    def run(task: str, context: str | dict[str, str] = "") -> tuple[str, dict[str, Any]]:
        return _content_and_artifact(graph.invoke({"task": task, "context": context}))

    async def arun(task: str, context: str | dict[str, str] = "") -> tuple[str, dict[str, Any]]:
        return _content_and_artifact(await graph.ainvoke({"task": task, "context": context}))

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=name,
        description=description,
        args_schema=AprToolInput,
        response_format="content_and_artifact",
    )


_serving = threading.Lock()


@functools.lru_cache(maxsize=1)
def _served(environment: tuple[tuple[str, str], ...]) -> App:
    """The graph ``make_graph`` serves, built from ``environment`` (only the last is kept)."""
    return compile_apr_graph(settings=AprSettings())


def make_graph(config: RunnableConfig | None = None) -> App:
    """The graph LangGraph Server serves (``langgraph.json``): settings from the environment
    (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``APR_*``); the server adds its checkpointer.

    Built once and reused until those variables change (the server calls a factory for every
    run and state read; one graph is one client and connection pool). A run's own settings
    come from its context (``AprContext``); ``config`` is not read.
    """
    names = ("APR_", "OPENAI_")  # the variables ``AprSettings()`` reads
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(names)))
    with _serving:  # the server may ask from several threads at once: build once
        return _served(key)
