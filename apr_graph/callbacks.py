"""Model calls reported to LangChain callback handlers, as a chat model reports its own.

apr-graph sends its requests without a LangChain chat model, so LangGraph's
``stream_mode="messages"`` and tracers (LangSmith, Langfuse, ...) would see none of them.
Each request of the HTTP transport is reported to the handlers of the node that sends it: a
chat request as a chat-model run (``on_chat_model_start`` with its messages, an
``AIMessageChunk`` per streamed piece), a native reasoner's text completion as an LLM run
(``on_llm_start`` with its prompt; tracers see it, the ``messages`` stream does not), then
``on_llm_end`` (text and token usage) or ``on_llm_error``. The metadata carries LangGraph's
(``langgraph_node`` ...), ``apr_role`` (``planner``, ``worker``, ``synthesizer`` ...) and
``apr_thread`` (a worker's subtask id, ``"direct"``, else ``None``). A run with no handler
(no ``messages`` stream, no tracer) costs one context lookup per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from langchain_core.runnables.config import (
    get_callback_manager_for_config,
    var_child_runnable_config,
)

from apr_graph.responses import Completion, StreamProgress
from apr_graph.transport import ChatRequest, TextRequest

if TYPE_CHECKING:
    from langchain_core.callbacks import CallbackManagerForLLMRun

__all__ = ["ModelRun", "model_run", "reported"]


class ModelRun:
    """One request, as a run of the callback handlers of the node that sent it."""

    def __init__(self, run: CallbackManagerForLLMRun, *, chat: bool) -> None:
        self._run = run
        self._chat = chat
        self.message_id = f"lc_run--{run.run_id}"  # what LangChain's chat models use

    def relay(self, then: Callable[[str], None] | None) -> Callable[[str], None]:
        """An ``on_text`` callback that reports each piece, then passes it to ``then``."""
        from langchain_core.messages import AIMessageChunk
        from langchain_core.outputs import ChatGenerationChunk, GenerationChunk

        def on_text(piece: str) -> None:
            chunk: ChatGenerationChunk | GenerationChunk = (
                ChatGenerationChunk(message=AIMessageChunk(content=piece, id=self.message_id))
                if self._chat
                else GenerationChunk(text=piece)
            )
            self._run.on_llm_new_token(piece, chunk=chunk)
            if then is not None:
                then(piece)

        return on_text

    def end(self, completion: Completion) -> None:
        """The request answered ``completion``."""
        from langchain_core.messages import AIMessage
        from langchain_core.outputs import ChatGeneration, Generation, LLMResult

        usage = {
            "input_tokens": completion.prompt_tokens,
            "output_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        }
        info = {"finish_reason": completion.finish_reason}
        generation = (
            ChatGeneration(
                message=AIMessage(
                    content=completion.text,
                    id=self.message_id,
                    usage_metadata=usage,
                    response_metadata=info,
                )
            )
            if self._chat
            else Generation(text=completion.text, generation_info=info)
        )
        self._run.on_llm_end(LLMResult(generations=[[generation]], llm_output={"usage": usage}))

    def error(self, error: BaseException) -> None:
        """The request failed (or was cancelled) with ``error``."""
        self._run.on_llm_error(error)


def model_run(request: ChatRequest | TextRequest) -> ModelRun | None:
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
            "ls_model_type": "llm" if isinstance(request, TextRequest) else "chat",
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
    name = f"apr_graph.{request.role}"
    if isinstance(request, TextRequest):
        params["stop"] = list(request.stop)
        (run,) = manager.on_llm_start(
            {"name": "apr_graph"}, [request.prompt], invocation_params=params, name=name
        )
        return ModelRun(run, chat=False)
    if request.tools:
        params["tools"] = list(request.tools)
    (run,) = manager.on_chat_model_start(
        {"name": "apr_graph"},
        [convert_to_messages(list(request.messages))],
        invocation_params=params,
        name=name,
    )
    return ModelRun(run, chat=True)


async def reported(
    request: ChatRequest | TextRequest,
    progress: StreamProgress,
    send: Callable[[], Awaitable[Completion]],
) -> Completion:
    """``send()``: the request sent, reported to the callback handlers of the node that
    sends it, if it has any (its streamed text goes to them as it arrives)."""
    report = model_run(request)
    if report is None:
        return await send()
    told = progress.on_text
    progress.on_text = report.relay(told)
    try:
        completion = await send()
    except BaseException as exc:
        report.error(exc)
        raise
    finally:
        progress.on_text = told
    report.end(completion)
    return completion
