"""Native reasoners replayed from real traces (issue 16), through the public API.

The ``ReplayServer`` answers like vLLM: it drops special tokens unless asked not to, honours
stop strings, stop token ids and ``max_tokens``, and refuses a request whose text departs
from the trace. Traces and their sources: ``tests/native_traces/README.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apr_graph import AprSettings, compile_apr_graph
from apr_graph.native import FORMATS, NativeProtocolError
from apr_graph.testing import ReplayServer
from tests.conftest import settings_for

TRACES = Path(__file__).parent / "native_traces"
TASK = "Solve the problem."
MV_PROMPT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n<|im_start|>user\nSolve the problem. Think step by step and in parallel before "
    "answering.<|im_end|>\n<|im_start|>assistant\n"
)
TW_PROMPT = (
    "<|im_start|>user\nSolve the problem. Let's think step by step and output the final answer "
    "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
)
MV_IDS = {"</Goal>": 151670, "</Path>": 151674}


def trace(name: str) -> str:
    # Bytes, not text mode: the comparisons below are exact, line endings included.
    return (TRACES / f"{name}.txt").read_bytes().decode("utf-8")


@pytest.fixture
def replay() -> Iterator[Any]:
    started: list[ReplayServer] = []

    def start(text: str, prompt: str, **kwargs: Any) -> ReplayServer:
        server = ReplayServer(text, prompt=prompt, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def settings(server: ReplayServer, **overrides: Any) -> AprSettings:
    """The shared test settings; a replayed trace has one answer per request: no retries."""
    return settings_for(server, **{"max_retries": 0, "probe_capacity": False, **overrides})


def completions(server: ReplayServer) -> list[dict[str, Any]]:
    return [r.body or {} for r in server.requests if r.path.endswith("/completions")]


@pytest.mark.parametrize("name", ["multiverse_1", "multiverse_4", "multiverse_5", "multiverse_12"])
async def test_multiverse_traces_replay_byte_for_byte(replay: Any, name: str) -> None:
    """Points 1, 3, 6-9: at default settings, on a server that skips special tokens by default,
    the reasoning is the trace to the byte; every path forks and none is cut."""
    text = trace(name)
    server = replay(text, MV_PROMPT)
    result = await compile_apr_graph(settings=settings(server, native="multiverse")).ainvoke(
        {"task": TASK}
    )
    assert result["plan"]["reasoning"] == text
    bodies = completions(server)
    assert all(b["skip_special_tokens"] is False for b in bodies)  # point 1
    assert all(b["max_tokens"] > 1024 for b in bodies)  # point 3: no 1,024-token cap
    assert bodies[0]["prompt"] == MV_PROMPT  # point 8
    threads = result["threads"]
    assert threads
    assert all(t["status"] == "done" for t in threads)
    forked = sum(block["forked"] for block in result["plan"]["blocks"])
    assert len(threads) == forked == len(re.findall(r"<Path>", text))


def test_a_real_path_is_longer_than_the_old_cap() -> None:
    longest = max(
        len(p.split()) for p in re.findall(r"<Path>(.*?)</Path>", trace("multiverse_1"), re.S)
    )
    assert longest > 2000  # words; the replay above forks it whole


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("multiverse_4", "\\boxed{187.12}"),
        ("multiverse_12", "840"),
        (
            "multiverse_5",
            "The continuous functions are \\(\\boxed{x(t) = 2 - e^{-t}}\\) and "
            "\\(\\boxed{y(t) = 3e^{t} + e^{-t} - 4}\\).",
        ),
    ],
)
async def test_the_answer_is_the_models_final_answer(replay: Any, name: str, answer: str) -> None:
    """Point 4: a trace that ends at </Think> answers with its Final Answer or last boxed."""
    server = replay(trace(name), MV_PROMPT)
    result = await compile_apr_graph(settings=settings(server, native="multiverse")).ainvoke(
        {"task": TASK}
    )
    assert result["answer"] == answer


async def test_depth_one_keeps_a_model_written_nested_block_intact(replay: Any) -> None:
    """Point 2: at max_depth=1 a path's own nested block neither forks nor ends the path."""
    text = trace("multiverse_5")
    server = replay(text, MV_PROMPT)
    app = compile_apr_graph(settings=settings(server, native="multiverse", max_depth=1))
    result = await app.ainvoke({"task": TASK})
    assert result["plan"]["reasoning"] == text
    assert {t["depth"] for t in result["threads"]} == {1}
    nested = next(t for t in result["threads"] if "<Parallel>" in (t["answer"] or ""))
    assert nested["answer"].count("<Path>") == nested["answer"].count("</Path>") == 2
    assert nested["answer"].endswith("3 e^{t} \\).")


async def test_stop_token_ids_are_sent_and_honoured(replay: Any) -> None:
    """Point 1: stop token ids, as both reference engines send them, work beside strings."""
    text = trace("multiverse_5")
    server = replay(text, MV_PROMPT, token_ids=MV_IDS)
    app = compile_apr_graph(
        settings=settings(server, native="multiverse", native_stop_token_ids=MV_IDS)
    )
    result = await app.ainvoke({"task": TASK})
    assert result["plan"]["reasoning"] == text
    bodies = completions(server)
    assert bodies[0]["stop_token_ids"] == [151670]
    assert any(b.get("stop_token_ids") == [151670, 151674] for b in bodies)


async def test_a_server_that_drops_the_tags_is_named(replay: Any) -> None:
    """Point 1: a run that gets no tags at all says why instead of answering with prose."""
    server = replay(trace("multiverse_5"), MV_PROMPT)
    app = compile_apr_graph(
        settings=settings(server, native="multiverse", native_skip_special_tokens=True)
    )
    with pytest.raises(NativeProtocolError, match="skip_special_tokens=false"):
        await app.ainvoke({"task": TASK})
    assert completions(server)[0]["skip_special_tokens"] is True


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("threadweaver_example", "The answer is \\boxed{790}."),
        ("threadweaver_figure", "Sum the results: 36 + 81 = 117..."),
    ],
)
async def test_threadweaver_traces_replay_byte_for_byte(
    replay: Any, name: str, answer: str
) -> None:
    """Points 4, 6, 8: ThreadWeaver's join (threads back to back) and its prompt."""
    text = trace(name)
    server = replay(text, TW_PROMPT)
    result = await compile_apr_graph(settings=settings(server, native="threadweaver")).ainvoke(
        {"task": TASK}
    )
    assert result["plan"]["reasoning"] == text
    assert result["answer"] == answer
    assert [t["id"] for t in sorted(result["threads"], key=lambda t: t["id"])] == ["b1.1", "b1.2"]
    bodies = completions(server)
    assert bodies[0]["prompt"] == TW_PROMPT
    assert {b["prompt"][-11:] for b in bodies[1:3]} == {"<Thread>\n1:", "<Thread>\n2:"}


def test_the_prompt_has_no_stray_newline_and_takes_context() -> None:
    """Point 8: the training prompts, with the context after a blank line when there is one."""
    prompt = FORMATS["multiverse"].prompt
    assert prompt.format(task=TASK, context="") == MV_PROMPT
    assert "\n<|im_end|>" not in prompt.format(task=TASK, context="")
    with_context = FORMATS["threadweaver"].prompt.format(task=TASK, context="\n\nx = 2")
    assert with_context.startswith("<|im_start|>user\nSolve the problem.\n\nx = 2 Let's think")


async def test_the_replay_server_refuses_a_departing_request(replay: Any) -> None:
    server = replay(trace("threadweaver_example"), TW_PROMPT)
    app = compile_apr_graph(settings=settings(server, native="threadweaver", native_prompt="Q"))
    with pytest.raises(Exception, match="ReplayServer: the prompt does not start"):
        await app.ainvoke({"task": TASK})
