"""Model calls reported to LangChain callback handlers, as a chat model reports its own.

apr-graph sends its requests without a LangChain chat model, so LangGraph's
``stream_mode="messages"`` and tracers (LangSmith, Langfuse, ...) would see none of them.
Each request of the HTTP transport is reported as a chat-model run of the node it serves:
``on_chat_model_start`` with its messages, ``on_llm_new_token`` with an ``AIMessageChunk``
per streamed piece, then ``on_llm_end`` (text and token usage) or ``on_llm_error``. The
metadata carries LangGraph's (``langgraph_node`` ...) and ``apr_role`` (``planner``,
``worker``, ``synthesizer`` ...) and ``apr_thread`` (a worker's subtask id, ``"direct"``,
else ``None``). A run with no handler (no ``messages`` stream, no tracer)
costs one context lookup per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from langchain_core.runnables.config import (
    get_callback_manager_for_config,
    var_child_runnable_config,
)

from apr_graph.responses import Completion
from apr_graph.transport import ChatRequest

if TYPE_CHECKING:
    from langchain_core.callbacks import CallbackManagerForLLMRun

__all__ = ["ModelRun", "model_run"]


class ModelRun:
    """One request, as a chat-model run of the callback handlers of the node that sent it."""

    def __init__(self, run: CallbackManagerForLLMRun) -> None:
        self._run = run
        self.message_id = f"lc_run--{run.run_id}"  # what LangChain's chat models use

    def relay(self, then: Callable[[str], None] | None) -> Callable[[str], None]:
        """An ``on_text`` callback that reports each piece, then passes it to ``then``."""
        from langchain_core.messages import AIMessageChunk
        from langchain_core.outputs import ChatGenerationChunk

        def on_text(piece: str) -> None:
            chunk = AIMessageChunk(content=piece, id=self.message_id)
            self._run.on_llm_new_token(piece, chunk=ChatGenerationChunk(message=chunk))
            if then is not None:
                then(piece)

        return on_text

    def end(self, completion: Completion) -> None:
        """The request answered ``completion``."""
        from langchain_core.messages import AIMessage
        from langchain_core.outputs import ChatGeneration, LLMResult

        usage = {
            "input_tokens": completion.prompt_tokens,
            "output_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        }
        message = AIMessage(
            content=completion.text,
            id=self.message_id,
            usage_metadata=usage,
            response_metadata={"finish_reason": completion.finish_reason},
        )
        generation = ChatGeneration(message=message)
        self._run.on_llm_end(LLMResult(generations=[[generation]]))

    def error(self, error: BaseException) -> None:
        """The request failed (or was cancelled) with ``error``."""
        self._run.on_llm_error(error)


def model_run(request: ChatRequest) -> ModelRun | None:
    """The report of ``request``, about to be sent, or ``None`` when nothing listens (outside
    a runnable, or a run without callback handlers)."""
    config = var_child_runnable_config.get()
    callbacks = config.get("callbacks") if config else None
    # A manager with no handlers (LangGraph's, when nothing listens), a list, or None.
    if config is None or not getattr(callbacks, "handlers", callbacks):
        return None
    from langchain_core.messages import convert_to_messages

    manager = get_callback_manager_for_config(config)
    manager.add_metadata(
        {
            "apr_role": request.role,
            "apr_thread": request.thread,
            "ls_provider": "openai",
            "ls_model_name": request.model,
            "ls_model_type": "chat",
            "ls_temperature": request.temperature,
            "ls_max_tokens": request.max_tokens,
        },
        inherit=False,
    )
    params: dict[str, Any] = {
        "model": request.model,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    if request.tools:
        params["tools"] = list(request.tools)
    (run,) = manager.on_chat_model_start(
        {"name": "apr_graph"},
        [convert_to_messages(list(request.messages))],
        invocation_params=params,
        name=f"apr_graph.{request.role}",
    )
    return ModelRun(run)
