"""A LangChain chat model as the backend gets each request's output limit and temperature.

The doubles record every request as a provider would get it, without sockets; one test sends
langchain-openai's ``ChatOpenAI`` to a scripted server on the loopback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field

from apr_graph import AprSettings, ChatModelClient, compile_apr_graph
from apr_graph.testing import RecordedRequest, Reply, Rule
from tests.conftest import ServerFactory


class ScriptedModel(BaseChatModel):
    """Plans ``plan``, answers each thread by its id, and records the limits of every request
    as a provider would get them (``_limits``)."""

    plan: dict[str, Any]
    needs: dict[str, int] = Field(default_factory=dict)
    """Tokens a thread's full answer takes: under a smaller limit it is cut off."""
    sent: list[dict[str, Any]] = Field(default_factory=list)
    """Every request: ``call`` (``planner``, a thread's id, or ``merge``), ``max_tokens`` and
    ``temperature`` (shared by copies of the model)."""
    temperature: float | None = None

    @property
    def _llm_type(self) -> str:
        return "scripted-fake"

    def _limits(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        last = str(messages[-1].content)
        asked = str(messages[1].content) if len(messages) > 1 else ""
        thread = re.search(r"^Subtask (\w+)", asked, re.M)
        cut = 0  # tokens of the answer written before, when this request continues it
        if "<task>" in last and "JSON schema" in str(messages[0].content):
            call, text = "planner", json.dumps(self.plan)
        elif thread is not None:
            call = thread.group(1)
            text = f"the answer of {call}\nFinal answer: {call}"
            if last.startswith("You were cut off"):
                cut, text = len(str(messages[-2].content)), text[10:]
        else:
            call, text = "merge", "merged"
        limits = self._limits(kwargs)
        self.sent.append({"call": call, **limits})
        metadata = {"finish_reason": "stop"}
        limit = limits["max_tokens"]
        if limit is not None and limit < self.needs.get(call, 0) - cut * 30:
            text, metadata = text[:10], {"finish_reason": "length"}
        message = AIMessage(content=text, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def calls(self, call: str) -> list[dict[str, Any]]:
        return [r for r in self.sent if r["call"] == call]


class OpenAILikeModel(ScriptedModel):
    """Limits read as langchain-openai builds a request: the model's fields, overridden by
    the call's keyword arguments."""

    max_tokens: int | None = None

    def _limits(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, **kwargs}


class OllamaLikeModel(ScriptedModel):
    """A model whose output limit is its ``num_predict`` and which refuses call arguments
    (langchain-ollama passes them on to the ollama client, which raises ``TypeError``)."""

    num_predict: int | None = None

    def _limits(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs:
            raise TypeError(f"chat() got unexpected keyword arguments {sorted(kwargs)}")
        return {"max_tokens": self.num_predict, "temperature": self.temperature}


def parallel(*subtasks: dict[str, Any]) -> dict[str, Any]:
    return {"strategy": "parallel", "merge": "synthesize", "subtasks": list(subtasks)}


async def test_a_thread_cut_by_its_limit_is_continued_with_its_own_limit() -> None:
    plan = parallel({"id": "s1", "goal": "prove the lemma"}, {"id": "s2", "goal": "name it"})
    model = OpenAILikeModel(plan=plan, needs={"s1": 500})
    settings = AprSettings(worker_max_tokens=300, synthesizer_max_tokens=700)

    result = await compile_apr_graph(model=model, settings=settings).ainvoke({"task": "t"})

    assert [r["max_tokens"] for r in model.calls("s1")] == [300, 300]
    assert [r["max_tokens"] for r in model.calls("s2")] == [300]
    assert [r["max_tokens"] for r in model.calls("merge")] == [700]
    threads = {t["id"]: t for t in result["threads"]}
    assert threads["s1"]["status"] == "done"
    assert threads["s1"]["answer"] == "the answer of s1\nFinal answer: s1"


async def test_a_votes_repeated_attempts_are_sampled_at_the_vote_temperature() -> None:
    goal = "find x"  # one goal three times: three attempts, voted on
    plan = parallel(*({"id": f"s{i}", "goal": goal} for i in (1, 2, 3)))
    model = OpenAILikeModel(plan=plan)
    # The whole plan first: a thread started while the plan streams is sent again once its
    # goal proves repeated.
    settings = AprSettings(temperature=0.1, vote_temperature=0.9, stream_plan=False)

    result = await compile_apr_graph(model=model, settings=settings).ainvoke({"task": "t"})

    assert result["plan"]["merge"] == "vote"
    # Each attempt answers differently, so none is stopped by an early majority.
    sent = {r["call"]: r["temperature"] for r in model.sent if r["call"] != "planner"}
    assert sent == {"s1": 0.1, "s2": 0.9, "s3": 0.9}
    assert model.calls("planner")[0]["temperature"] == 0.1


async def test_a_model_whose_limit_is_num_predict_gets_it_there() -> None:
    plan = parallel({"id": "s1", "goal": "prove the lemma"}, {"id": "s2", "goal": "name it"})
    model = OllamaLikeModel(plan=plan, needs={"s1": 500})
    settings = AprSettings(worker_max_tokens=300, temperature=0.2)

    result = await compile_apr_graph(model=model, settings=settings).ainvoke({"task": "t"})

    assert [(r["max_tokens"], r["temperature"]) for r in model.calls("s1")] == [
        (300, 0.2),
        (300, 0.2),
    ]
    assert model.calls("merge")[0]["max_tokens"] == settings.synthesizer_max_tokens
    assert {t["status"] for t in result["threads"]} == {"done"}


async def test_a_temperature_given_to_the_model_holds_unless_the_settings_give_one() -> None:
    direct = {"strategy": "direct", "answer": "4"}
    model = OpenAILikeModel(plan=direct, temperature=0.3)
    await compile_apr_graph(model=model).ainvoke({"task": "2+2"})
    forced = OpenAILikeModel(plan=direct, temperature=0.3)
    await compile_apr_graph(model=forced, settings=AprSettings(temperature=0.0)).ainvoke(
        {"task": "2+2"}
    )

    assert [r["temperature"] for r in model.sent] == [0.3]
    assert [r["temperature"] for r in forced.sent] == [0.0]


async def test_chatopenai_sends_the_limits_to_the_server(make_server: ServerFactory) -> None:
    from langchain_openai import ChatOpenAI

    def worker(request: RecordedRequest) -> Reply:
        if request.body.get("max_completion_tokens", 500) < 500:  # none sent: no limit
            return Reply(content="The proof begins", finish_reason="length")
        return Reply(content="The proof, in full")

    server = make_server(
        [  # a chat model sends no role header: the rules go by the messages
            Rule(contains="Subtask ", reply=worker),
            Rule(contains="You were cut off", reply=Reply(content="and ends here.")),
            Rule(contains="All threads have finished", reply=Reply(content="merged")),
            Rule(reply=Reply(content=parallel({"id": "s1", "goal": "prove the lemma"}))),
        ]
    )
    model = ChatOpenAI(base_url=server.base_url, api_key="k", model="test-model", max_retries=0)
    limits = {"planner_max_tokens": 800, "worker_max_tokens": 300, "synthesizer_max_tokens": 700}
    client = ChatModelClient(model, AprSettings(**limits, temperature=0.2))
    try:
        result = await compile_apr_graph(client=client).ainvoke({"task": "t"})
    finally:
        # langchain-openai keeps the model's HTTP client in a global cache; its connections
        # were opened on this test's loop, so they are closed here, before that loop stops
        await model.root_async_client.close()
        await client.aclose()

    bodies = [r.body for r in server.chat_requests()]
    sent = [(b.get("max_completion_tokens"), b.get("temperature")) for b in bodies]
    assert sent == [(800, 0.2), (300, 0.2), (300, 0.2), (700, 0.2)]
    assert result["threads"][0]["answer"] == "The proof begins and ends here."


class Chunked(BaseChatModel):
    """Streams ``chunks`` as they are, with no usage (as many providers' streams come)."""

    chunks: list[str]

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self.chunks:
            yield ChatGenerationChunk(message=AIMessageChunk(content=chunk))

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage("".join(self.chunks)))])

    @property
    def _llm_type(self) -> str:
        return "chunked-fake"


async def test_a_stream_without_usage_is_counted_by_its_chunks_or_its_characters() -> None:
    # Counting (the speed probe's request) streams a token of 2-3 characters a chunk: at 4
    # characters a token it read as a quarter of its length, too short to time.
    numbers = [f"{n} " for n in range(1, 41)]
    prose = ["The quick brown fox jumps over the lazy dog. " * 2] * 4  # a few tokens a chunk
    for chunks, tokens in ((numbers, 40), (prose, len("".join(prose)) // 4)):
        client = ChatModelClient(Chunked(chunks=chunks), AprSettings(stop_loops=False))
        done = await client.chat([{"role": "user", "content": "Go."}], role="worker")
        assert done.text == "".join(chunks).strip()
        assert done.completion_tokens == tokens
        await client.aclose()
