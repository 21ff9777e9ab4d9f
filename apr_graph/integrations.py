"""apr-graph inside the LangChain / LangGraph ecosystem: as a tool, and as a deployable graph.

- ``as_tool``: a LangChain tool (sync and async) an agent calls to hand off a hard,
  decomposable question; its content is the answer, its artifact the run record.
- ``make_graph``: the factory ``langgraph.json`` points LangGraph Server at (settings from the
  environment).
- As a subgraph, the compiled graph is a node of your own graph as it is: its input
  (``task``, ``context``) and output (``answer``, ``plan``, ``threads``, ``metrics``) schemas
  only touch those keys, and its events stream through the parent with ``subgraphs=True``.
"""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.graph import StateGraph
from pydantic import BaseModel, Field

from apr_graph.context import AprContext
from apr_graph.graph import App, compile_apr_graph, create_apr_graph
from apr_graph.llm import LLMClient
from apr_graph.settings import AprSettings
from apr_graph.state import AprInput, AprOutput, AprState

__all__ = ["AprToolInput", "as_tool", "make_graph"]

DEFAULT_DESCRIPTION = (
    "Solve a hard question that has several independent parts (sub-questions, items to "
    "examine, approaches to compare): it is split into parallel threads whose results are "
    "merged. Give the complete question; add any facts the threads need as context."
)


class AprToolInput(BaseModel):
    """Arguments of the apr-graph tool."""

    task: str = Field(description="The complete question or task, self-contained.")
    context: str = Field(default="", description="Facts or material the threads may need.")


def _record(result: dict[str, Any]) -> dict[str, Any]:
    return {key: result.get(key) for key in ("plan", "threads", "metrics")}


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

    def run(task: str, context: str = "") -> tuple[str, dict[str, Any]]:
        result = graph.invoke({"task": task, "context": context})
        return str(result.get("answer", "")), _record(dict(result))

    async def arun(task: str, context: str = "") -> tuple[str, dict[str, Any]]:
        result = await graph.ainvoke({"task": task, "context": context})
        return str(result.get("answer", "")), _record(dict(result))

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=name,
        description=description,
        args_schema=AprToolInput,
        response_format="content_and_artifact",
    )


def make_graph(
    config: RunnableConfig | None = None,
) -> StateGraph[AprState, AprContext, AprInput, AprOutput]:
    """The graph LangGraph Server serves (``langgraph.json``): settings from the environment
    (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``APR_*``); the server adds its checkpointer."""
    return create_apr_graph(settings=AprSettings())
