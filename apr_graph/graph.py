"""The factory: wiring only. Prompts live in ``prompts``, HTTP behind ``llm``, logic in nodes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import Runnable, RunnableLambda

try:  # how LangGraph wraps a plain function node; not exported, so a fallback is kept
    from langgraph._internal._runnable import RunnableCallable
except ImportError:  # pragma: no cover - a LangGraph that moved it
    RunnableCallable = None  # type: ignore[assignment,misc]
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime, get_runtime
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer

from apr_graph.board import Boards
from apr_graph.context import AprContext
from apr_graph.decide import speed_store
from apr_graph.errors import ConfigurationError
from apr_graph.llm import LLMClient
from apr_graph.nodes import (
    Verifier,
    make_decompose,
    make_fan_out,
    make_finish,
    make_join,
    make_synthesize,
    make_worker,
)
from apr_graph.nodes.native import make_native
from apr_graph.nodes.review import make_review
from apr_graph.settings import AprSettings
from apr_graph.speed import SpeedStore
from apr_graph.state import AprInput, AprOutput, AprState, ForkInput, WorkerInput

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.tools import BaseTool

__all__ = [
    "DECOMPOSE",
    "FINISH",
    "JOIN",
    "NATIVE",
    "REVIEW",
    "SYNTHESIZE",
    "WORKER",
    "boards_of",
    "compile_apr_graph",
    "create_apr_graph",
]

DECOMPOSE = "decompose"
WORKER = "worker"
SYNTHESIZE = "synthesize"
JOIN = "join"
FINISH = "finish"
NATIVE = "native"
REVIEW = "review"

Node = Callable[[Any], Awaitable[dict[str, Any]]]
RunNode = Callable[[Any, AprSettings], Awaitable[dict[str, Any]]]
"""A node: the state (or a ``Send`` payload) and the run's effective settings."""
Graph = StateGraph[AprState, AprContext, Any, AprOutput]
App = CompiledStateGraph[AprState, AprContext, AprInput, AprOutput]

_BOARDS_ATTR = "_apr_boards"
"""Where a builder keeps its graph's live boards (for ``boards_of``; no module registry)."""


def boards_of(app: App) -> Boards:
    """The live run boards of a compiled apr-graph (what is running now, in this process).

    Raises:
        ConfigurationError: ``app`` was not built by ``create_apr_graph``.
    """
    boards = getattr(app.builder, _BOARDS_ATTR, None)
    if not isinstance(boards, Boards):
        raise ConfigurationError("this graph was not built by create_apr_graph")
    return boards


def _node(name: str, node: RunNode, client: LLMClient, boards: Boards) -> Runnable[Any, Any]:
    """``node`` usable from both ``ainvoke`` and ``invoke``, given the run's settings (the
    graph's, with what its ``AprContext`` changes: a context of another type is a parent
    graph's own), releasing its run's board when it fails or is cancelled (the run is over).

    A sync run's node runs whole on the client's one helper loop (``LLMClient.run_sync``): a
    loop per node would open a connection pool per node. Wrapped as LangGraph wraps a plain
    function (``trace=False``): a ``RunnableLambda`` would build a callback run per call.
    """
    settings = client.settings

    async def anode(state: Any, runtime: Runtime[Any]) -> dict[str, Any]:
        context = runtime.context
        try:
            return await node(
                state, context.apply(settings) if isinstance(context, AprContext) else settings
            )
        except BaseException:
            if state.get("run_id"):
                boards.close(state["run_id"], root=not state.get("depth"))
            raise

    def func(state: Any, runtime: Runtime[Any]) -> dict[str, Any]:
        return client.run_sync(anode(state, runtime))

    if RunnableCallable is None:  # pragma: no cover
        return RunnableLambda(
            lambda state: func(state, get_runtime()),
            afunc=lambda state: anode(state, get_runtime()),
            name=name,
        )
    return RunnableCallable(func, anode, name=name, trace=False)


def _check(
    settings: AprSettings | None,
    client: LLMClient | None,
    model: BaseChatModel | None,
    verify: Verifier | None,
    tools: Sequence[BaseTool],
) -> None:
    """Refuse argument combinations that cannot work, saying how to fix the call."""
    if model is not None and client is not None:
        raise ConfigurationError(
            "pass either model= (a LangChain chat model) or client= (a ready LLMClient), not both"
        )
    native = (settings.native if settings is not None else None) or (
        client.settings.native if client is not None else None
    )
    if native is None:
        return
    if model is not None:
        raise ConfigurationError(
            f"AprSettings(native={native!r}) streams raw text completions, which a LangChain "
            "chat model cannot serve: drop model= and set AprSettings(base_url=...) to an "
            "OpenAI-compatible server, or drop native="
        )
    for name, given in (("tools", bool(tools)), ("verify", verify is not None)):
        if given:
            raise ConfigurationError(
                f"{name}= works with prompted threads only; the native mode writes its own "
                f"threads: drop {name}= or native="
            )


def create_apr_graph(
    *,
    settings: AprSettings | None = None,
    client: LLMClient | None = None,
    model: BaseChatModel | None = None,
    verify: Verifier | None = None,
    tools: Sequence[BaseTool] = (),
) -> StateGraph[AprState, AprContext, AprInput, AprOutput]:
    """Build the adaptive parallel reasoning graph (uncompiled): the model answers directly
    or splits the task into independent subtasks, run as concurrent threads and merged.

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
        Its ``context_schema`` is ``AprContext``: a run may change the models, width, merge,
        budgets and deadline with ``invoke(..., context={"max_threads": 2})``.

    Raises:
        ConfigurationError: no ``base_url`` is configured, or arguments that cannot work
            together (``model`` with ``client``; ``native`` with ``model``, ``tools`` or
            ``verify``).

    Example:
        >>> from apr_graph import AprSettings, create_apr_graph
        >>> settings = AprSettings(base_url="http://localhost:8000/v1", model="Qwen/Qwen3-8B")
        >>> app = create_apr_graph(settings=settings).compile()
        >>> # result = await app.ainvoke({"task": "Compare A, B and C on cost and speed"})
        >>> # quick = await app.ainvoke({"task": "..."}, context={"model": "Qwen/Qwen3-1.7B"})
    """
    _check(settings, client, model, verify, tools)
    if model is not None:
        from apr_graph.chat_model import ChatModelClient

        client = ChatModelClient(model, settings)
    if client is None:
        client = LLMClient(settings or AprSettings())
    boards, speed = Boards(), speed_store(client.settings)
    builder = _build(AprInput, client, boards, speed, verify, tuple(tools), [])
    setattr(builder, _BOARDS_ATTR, boards)
    return builder


def _build(
    input_schema: type[Any],
    client: LLMClient,
    boards: Boards,
    speed: SpeedStore,
    verify: Verifier | None,
    tools: tuple[BaseTool, ...],
    fork: list[CompiledStateGraph[AprState, AprContext, Any, AprOutput]],
) -> Graph:
    """Wire the graph. A forking thread runs the same wiring one level deeper, with the
    internal ``ForkInput`` (compiled once, on first use, given its parent run's settings)."""
    builder: Graph = StateGraph(
        AprState, context_schema=AprContext, input_schema=input_schema, output_schema=AprOutput
    )
    settings = client.settings

    def subgraph(run: AprSettings) -> Node:
        if not fork:
            child = _build(ForkInput, client, boards, speed, verify, tools, fork)
            fork.append(child.compile(name="apr-graph-fork"))
        compiled, context = fork[0], None if run is settings else AprContext.of(run)

        async def run_fork(child_input: dict[str, Any]) -> dict[str, Any]:
            # The context is passed on, not inherited: a sync run's nodes run on the
            # client's loop, outside the parent graph's config.
            result: dict[str, Any] = await compiled.ainvoke(child_input, context=context)
            return result

        return run_fork

    def add(name: str, node: RunNode, **kwargs: Any) -> None:
        builder.add_node(name, _node(name, node, client, boards), **kwargs)

    if settings.native is not None:
        add(NATIVE, make_native(client, boards, native=settings.native))
        builder.add_edge(START, NATIVE)
        builder.add_edge(NATIVE, FINISH)
    else:
        worker = make_worker(client, boards, verify=verify, subgraph=subgraph, tools=tools)
        decompose = make_decompose(client, boards, speed=speed, start_early=not tools, tools=tools)
        add(DECOMPOSE, decompose)
        builder.add_node(REVIEW, make_review(settings, boards))
        add(WORKER, worker, input_schema=WorkerInput)
        add(SYNTHESIZE, make_synthesize(client, boards))
        builder.add_edge(START, DECOMPOSE)
        builder.add_edge(DECOMPOSE, REVIEW)
        # The join changes nothing: the workers' step is over; its router decides what is next.
        builder.add_node(JOIN, RunnableLambda(lambda _: {}, name=JOIN))
        fan_out = make_fan_out(WORKER, FINISH, boards)
        builder.add_conditional_edges(REVIEW, fan_out, [WORKER, FINISH])
        builder.add_edge(WORKER, JOIN)
        builder.add_conditional_edges(
            JOIN, make_join(WORKER, SYNTHESIZE, boards), [WORKER, SYNTHESIZE]
        )
        builder.add_edge(SYNTHESIZE, FINISH)
    add(FINISH, make_finish(client, boards, speed))
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
    store: BaseStore | None = None,
    name: str = "apr-graph",
) -> App:
    """``create_apr_graph(...).compile(...)`` in one call. With a ``store`` (or LangGraph
    Server's), endpoint speed profiles live there, shared by every process that uses it,
    unless ``speed_file`` is set.

    Example:
        >>> app = compile_apr_graph(settings=AprSettings(base_url="http://localhost:11434/v1"))
        >>> # result = app.invoke({"task": "What is 2 + 2?"})
    """
    return create_apr_graph(
        settings=settings, client=client, model=model, verify=verify, tools=tools
    ).compile(checkpointer=checkpointer, store=store, name=name)
