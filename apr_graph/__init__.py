"""apr-graph: adaptive parallel reasoning for LangGraph on any OpenAI-compatible server.

The model decides per task whether to answer directly or to fork into parallel threads;
the threads run concurrently and their results are merged.

Example:
    >>> from apr_graph import AprSettings, compile_apr_graph
    >>> app = compile_apr_graph(settings=AprSettings(base_url="http://localhost:8000/v1"))
    >>> # result = app.invoke({"task": "Solve (a) 17*23 (b) 2**10 (c) 99+1"})
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apr_graph.chat_model import ChatModelClient as ChatModelClient
    from apr_graph.context import AprContext as AprContext
    from apr_graph.durable import prepare_resume as prepare_resume
    from apr_graph.durable import resume_run as resume_run
    from apr_graph.errors import AprError as AprError
    from apr_graph.errors import AuthenticationError as AuthenticationError
    from apr_graph.errors import BudgetExhaustedError as BudgetExhaustedError
    from apr_graph.errors import ConfigurationError as ConfigurationError
    from apr_graph.errors import ContextOverflowError as ContextOverflowError
    from apr_graph.errors import InputError as InputError
    from apr_graph.errors import ModelCallError as ModelCallError
    from apr_graph.errors import ModelNotFoundError as ModelNotFoundError
    from apr_graph.errors import ServerCapabilityError as ServerCapabilityError
    from apr_graph.errors import ServerUnreachableError as ServerUnreachableError
    from apr_graph.errors import StructuredOutputError as StructuredOutputError
    from apr_graph.graph import compile_apr_graph as compile_apr_graph
    from apr_graph.graph import create_apr_graph as create_apr_graph
    from apr_graph.integrations import as_tool as as_tool
    from apr_graph.llm import LLMClient as LLMClient
    from apr_graph.plan_schema import Plan as Plan
    from apr_graph.plan_schema import Subtask as Subtask
    from apr_graph.responses import Completion as Completion
    from apr_graph.settings import AprSettings as AprSettings
    from apr_graph.settings import MergeStrategy as MergeStrategy
    from apr_graph.state import AprInput as AprInput
    from apr_graph.state import AprOutput as AprOutput
    from apr_graph.state import PlanRecord as PlanRecord
    from apr_graph.state import ThreadRecord as ThreadRecord
    from apr_graph.transport import Transport as Transport


__version__ = "0.1.0"

_WHERE = {
    name: f"apr_graph.{module}"
    for module, names in {
        "chat_model": "ChatModelClient",
        "context": "AprContext",
        "durable": "prepare_resume resume_run",
        "errors": "AprError AuthenticationError BudgetExhaustedError ConfigurationError "
        "ContextOverflowError InputError ModelCallError ModelNotFoundError ServerCapabilityError "
        "ServerUnreachableError StructuredOutputError",
        "graph": "compile_apr_graph create_apr_graph",
        "integrations": "as_tool",
        "llm": "LLMClient",
        "plan_schema": "Plan Subtask",
        "responses": "Completion",
        "settings": "AprSettings MergeStrategy",
        "state": "AprInput AprOutput PlanRecord ThreadRecord",
        "transport": "Transport",
    }.items()
    for name in names.split()
}
"""Where each public name lives: imported on first use, so ``import apr_graph`` (and every
``apr`` subcommand or test double that needs only a corner of it) stays cheap."""

__all__ = [  # literal, for static tools; test_layout checks it against _WHERE
    "AprContext",
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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'apr_graph' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
