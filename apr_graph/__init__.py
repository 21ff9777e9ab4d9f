"""apr-graph: adaptive parallel reasoning for LangGraph on any OpenAI-compatible server.

The model decides per task whether to answer directly or to fork into parallel threads;
the threads run concurrently and their results are merged.

Example:
    >>> from apr_graph import AprSettings, compile_apr_graph
    >>> app = compile_apr_graph(settings=AprSettings(base_url="http://localhost:8000/v1"))
    >>> # result = app.invoke({"task": "Solve (a) 17*23 (b) 2**10 (c) 99+1"})
"""

from typing import TYPE_CHECKING, Any

from apr_graph.durable import prepare_resume, resume_run
from apr_graph.errors import (
    AprError,
    AuthenticationError,
    BudgetExhaustedError,
    ConfigurationError,
    ContextOverflowError,
    InputError,
    ModelCallError,
    ModelNotFoundError,
    ServerCapabilityError,
    ServerUnreachableError,
    StructuredOutputError,
)
from apr_graph.graph import compile_apr_graph, create_apr_graph
from apr_graph.integrations import as_tool
from apr_graph.llm import LLMClient
from apr_graph.responses import Completion
from apr_graph.settings import AprSettings, MergeStrategy
from apr_graph.state import AprInput, AprOutput, Plan, PlanRecord, Subtask, ThreadRecord
from apr_graph.transport import Transport

if TYPE_CHECKING:
    from apr_graph.chat_model import ChatModelClient

__all__ = [
    "AprError",
    "AprInput",
    "AprOutput",
    "AprSettings",
    "AuthenticationError",
    "BudgetExhaustedError",
    "ChatModelClient",
    "Completion",
    "ConfigurationError",
    "ContextOverflowError",
    "InputError",
    "LLMClient",
    "MergeStrategy",
    "ModelCallError",
    "ModelNotFoundError",
    "Plan",
    "PlanRecord",
    "ServerCapabilityError",
    "ServerUnreachableError",
    "StructuredOutputError",
    "Subtask",
    "ThreadRecord",
    "Transport",
    "as_tool",
    "compile_apr_graph",
    "create_apr_graph",
    "prepare_resume",
    "resume_run",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # LangChain's chat-model stack is heavy to import; only users of it pay for it.
    if name == "ChatModelClient":
        from apr_graph.chat_model import ChatModelClient

        return ChatModelClient
    raise AttributeError(f"module 'apr_graph' has no attribute {name!r}")
