"""The factory: wiring only. Prompts live in ``prompts``, HTTP in ``llm``, logic in ``nodes``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Checkpointer

from apr_graph.chat_model import ChatModelClient
from apr_graph.coordination import REGISTRY
from apr_graph.llm import LLMClient
from apr_graph.nodes import (
    Verifier,
    make_decompose,
    make_fan_out,
    make_finish,
    make_synthesize,
    make_worker,
)
from apr_graph.nodes.native import make_native
from apr_graph.settings import AprSettings
from apr_graph.state import AprInput, AprOutput, AprState, WorkerInput

__all__ = [
    "DECOMPOSE",
    "FINISH",
    "NATIVE",
    "SYNTHESIZE",
    "WORKER",
    "compile_apr_graph",
    "create_apr_graph",
]

DECOMPOSE = "decompose"
WORKER = "worker"
SYNTHESIZE = "synthesize"
FINISH = "finish"
NATIVE = "native"


def _sync_and_async(
    name: str, afunc: Callable[[Any], Awaitable[dict[str, Any]]], client: LLMClient
) -> RunnableLambda[Any, dict[str, Any]]:
    """A node usable from both ``ainvoke`` and ``invoke``."""

    def func(state: Any) -> dict[str, Any]:
        return client.run_sync(afunc(state))  # type: ignore[arg-type]

    return RunnableLambda(func, afunc=afunc, name=name)


def create_apr_graph(
    *,
    settings: AprSettings | None = None,
    client: LLMClient | None = None,
    model: BaseChatModel | None = None,
    verify: Verifier | None = None,
    tools: Sequence[BaseTool] = (),
) -> StateGraph[AprState, None, AprInput, AprOutput]:
    """Build the adaptive parallel reasoning graph (uncompiled).

    The model first decides whether to answer directly (one call) or to split the task into
    independent subtasks; each subtask becomes a thread (a ``Send``) and the threads run
    concurrently, then one call merges their results.

    Args:
        settings: endpoint, models and limits; default ``AprSettings()`` (read from the
            environment: ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``APR_*``).
        client: a ready client to share between graphs; built from ``settings`` if omitted.
        model: a LangChain chat model (``ChatOpenAI``, ``ChatOllama``...) to use instead of
            the built-in OpenAI-compatible client.
        tools: LangChain tools the threads may call (the allowlist), through the OpenAI tools
            API, at most ``max_tool_calls`` per thread; a tool error goes back to the model.
        verify: your check of a thread's answer, ``verify(answer) -> bool`` (sync or async).
            A rejected result is replaced by a fresh attempt (``max_replacements``); in a
            ``race`` the first accepted result wins. Without it, races use a verifier call.

    Returns:
        A ``StateGraph``; compile it with the checkpointer of your choice. Input
        ``{"task": str, "context": str?}``; output ``answer``, ``plan``, ``threads``, ``metrics``.

    Raises:
        ConfigurationError: no ``base_url`` is configured.

    Example:
        >>> from apr_graph import AprSettings, create_apr_graph
        >>> settings = AprSettings(base_url="http://localhost:8000/v1", model="Qwen/Qwen3-8B")
        >>> app = create_apr_graph(settings=settings).compile()
        >>> # result = await app.ainvoke({"task": "Compare A, B and C on cost and speed"})
    """
    if model is not None:
        client = client or ChatModelClient(model, settings)
        settings = client.settings
    settings = settings or AprSettings()
    client = client or LLMClient(settings)
    boards = REGISTRY
    builder = StateGraph(AprState, input_schema=AprInput, output_schema=AprOutput)
    compiled: list[CompiledStateGraph[AprState, None, AprInput, AprOutput]] = []

    def subgraph() -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        # A forking thread runs this very graph one level deeper (compiled once, on first
        # use; as a subgraph it inherits the parent's checkpointer and stream).
        if not compiled:
            compiled.append(builder.compile(name="apr-graph-fork"))
        return compiled[0].ainvoke  # type: ignore[return-value]

    if settings.native is not None:
        builder.add_node(NATIVE, _sync_and_async(NATIVE, make_native(client, settings, boards),
                                                 client))  # fmt: skip
        builder.add_node(FINISH, RunnableLambda(make_finish(boards), name=FINISH))
        builder.add_edge(START, NATIVE)
        builder.add_edge(NATIVE, FINISH)
        builder.add_edge(FINISH, END)
        return builder
    worker = make_worker(
        client, settings, boards, verify=verify, subgraph=subgraph, tools=tuple(tools)
    )
    builder.add_node(
        DECOMPOSE, _sync_and_async(DECOMPOSE, make_decompose(client, settings, boards), client)
    )
    builder.add_node(WORKER, _sync_and_async(WORKER, worker, client), input_schema=WorkerInput)
    builder.add_node(
        SYNTHESIZE, _sync_and_async(SYNTHESIZE, make_synthesize(client, settings, boards), client)
    )
    builder.add_node(FINISH, RunnableLambda(make_finish(boards), name=FINISH))
    builder.add_edge(START, DECOMPOSE)
    builder.add_conditional_edges(
        DECOMPOSE,
        make_fan_out(WORKER, FINISH),
        [WORKER, FINISH],
    )
    builder.add_edge(WORKER, SYNTHESIZE)
    builder.add_edge(SYNTHESIZE, FINISH)
    builder.add_edge(FINISH, END)
    return builder


def compile_apr_graph(
    *,
    settings: AprSettings | None = None,
    client: LLMClient | None = None,
    model: BaseChatModel | None = None,
    verify: Verifier | None = None,
    tools: Sequence[BaseTool] = (),
    checkpointer: Checkpointer = None,
    name: str = "apr-graph",
) -> CompiledStateGraph[AprState, None, AprInput, AprOutput]:
    """``create_apr_graph(...).compile(...)`` in one call.

    Example:
        >>> app = compile_apr_graph(settings=AprSettings(base_url="http://localhost:11434/v1"))
        >>> # result = app.invoke({"task": "What is 2 + 2?"})
    """
    return create_apr_graph(
        settings=settings, client=client, model=model, verify=verify, tools=tools
    ).compile(checkpointer=checkpointer, name=name)
