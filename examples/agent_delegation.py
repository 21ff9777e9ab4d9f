"""A LangChain agent that hands hard, decomposable questions to apr-graph as a tool.

    OPENAI_BASE_URL=http://localhost:8000/v1 APR_MODEL=Qwen/Qwen3-8B \\
        python examples/agent_delegation.py "Compare Python, Rust and Go for a CLI tool"

No server? ``apr serve`` starts the embedded demo model and prints its URL; in another
terminal: ``OPENAI_BASE_URL=<that URL> APR_MODEL=smollm2 python examples/agent_delegation.py``.
"""

from __future__ import annotations

import os
import sys

from langchain.agents import create_agent
from langchain_openai import ChatOpenAI

from apr_graph import AprSettings, as_tool


def build_agent() -> object:
    settings = AprSettings()
    model = ChatOpenAI(
        base_url=settings.base_url,
        api_key=settings.api_key,
        model=settings.model,
        max_retries=0,
    )
    return create_agent(
        model,
        tools=[as_tool(settings=settings)],
        system_prompt="For questions with several independent parts, use parallel_reasoning.",
    )


def main(question: str) -> None:
    agent = build_agent()
    result = agent.invoke({"messages": [{"role": "user", "content": question}]})  # type: ignore[attr-defined]
    print(result["messages"][-1].content)


if __name__ == "__main__":
    if not os.environ.get("OPENAI_BASE_URL"):
        sys.exit(
            "set OPENAI_BASE_URL (and APR_MODEL) to an OpenAI-compatible server, or run "
            "'apr serve' in another terminal and use the URL it prints"
        )
    main(" ".join(sys.argv[1:]) or "Compare Python, Rust and Go for a command-line tool")
