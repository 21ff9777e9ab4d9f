"""Prefix sharing you can see, and width that fits the server."""

from __future__ import annotations

import json
import os
from typing import Any

from apr_graph import compile_apr_graph
from apr_graph.testing import Reply, Rule
from tests.conftest import ServerFactory, settings_for
from tests.test_graph import echo_worker, merge_synth

TASK = (
    "A small web shop wants a short review of its checkout flow: the cart page, the address "
    "form, the payment step and the confirmation e-mail. For each part, list the two most "
    "likely causes of abandoned checkouts and one fix."
)


def four_parts() -> dict[str, Any]:
    goals = [
        "review the cart page",
        "review the address form",
        "review the payment step",
        "review the confirmation e-mail",
    ]
    return {
        "strategy": "parallel",
        "subtasks": [{"id": f"s{i + 1}", "goal": g} for i, g in enumerate(goals)],
    }


async def test_a_fan_out_shares_a_byte_identical_prefix(make_server: ServerFactory) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content=four_parts())), echo_worker(), merge_synth()]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": TASK})
    prompts = [
        json.dumps(r.messages, ensure_ascii=False).encode() for r in server.chat_requests("worker")
    ]
    shared = len(os.path.commonprefix(prompts))  # noqa: RUF071
    # Everything up to each thread's own message is one byte-identical prefix: the system
    # message (instructions and the task) and the start of the user turn.
    system = json.dumps(server.chat_requests("worker")[0].messages[:1], ensure_ascii=False)
    assert shared > len(system[:-1].encode())
    assert shared >= 0.85 * min(len(p) for p in prompts)
    # apr-graph computes the same figure itself.
    assert result["metrics"]["shared_prefix_fraction"] == round(
        shared / min(len(p) for p in prompts), 4
    )


async def test_warm_up_primes_the_prefix_and_cached_tokens_reach_metrics(
    make_server: ServerFactory,
) -> None:
    cached = {
        "prompt_tokens": 300,
        "completion_tokens": 4,
        "total_tokens": 304,
        "prompt_tokens_details": {"cached_tokens": 280},
    }
    server = make_server(
        [
            Rule(role="planner", reply=Reply(content=four_parts())),
            Rule(role="warmup", reply=Reply(content="OK")),
            Rule(role="worker", reply=Reply(content="a result here", usage=cached)),
            merge_synth(),
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server, warm_prefix=True)).ainvoke(
        {"task": TASK}
    )
    warm = server.chat_requests("warmup")
    assert len(warm) == 1
    assert warm[0].body["max_tokens"] == 1
    first_worker = min(r.started_at for r in server.chat_requests("worker"))
    assert warm[0].ended_at is not None
    assert warm[0].ended_at <= first_worker
    assert warm[0].messages[0] == server.chat_requests("worker")[0].messages[0]  # same prefix
    assert result["metrics"]["cached_tokens"] == 4 * 280
    assert result["metrics"]["cache_hit_fraction"] > 0


async def test_llama_cpp_timings_cache_n_reaches_metrics(make_server: ServerFactory) -> None:
    server = make_server(
        [
            Rule(
                role="planner",
                reply=Reply(
                    content={"strategy": "direct", "answer": "4"},
                    extra={"timings": {"cache_n": 17}},
                ),
            )
        ]
    )
    result = await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "2+2"})
    assert result["metrics"]["cached_tokens"] == 17


async def test_concurrency_follows_the_probed_slot_count(make_server: ServerFactory) -> None:
    plan = {
        "strategy": "parallel",
        "subtasks": [{"id": f"s{i}", "goal": f"compute part {i}"} for i in range(1, 7)],
    }
    server = make_server(
        [Rule(role="planner", reply=Reply(content=plan)), echo_worker(0.3), merge_synth()],
        routes={"/props": {"total_slots": 3}},
    )
    await compile_apr_graph(settings=settings_for(server)).ainvoke({"task": "six parts"})
    workers = server.chat_requests("worker")
    peak = max(
        sum(1 for o in workers if o.started_at <= w.started_at < (o.ended_at or 0)) for w in workers
    )
    assert peak == 3
    assert "runs 3 threads at once" in server.chat_requests("planner")[0].messages[0]["content"]


async def test_vllm_metrics_and_silent_servers(make_server: ServerFactory) -> None:
    # vLLM's cache_config_info carries the KV cache, not the scheduler's max_num_seqs.
    metrics = 'vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1.0\n'
    vllm = make_server([], routes={"/metrics": metrics})
    silent = make_server([])
    from apr_graph import LLMClient

    client = LLMClient(settings_for(vllm, max_concurrency=5))
    assert await client.capacity() == 5  # the width is unknown: the setting holds
    report = await client.capacity_report()
    assert (report["width"], report["kv_cache_tokens"]) == (None, 1600)
    assert await LLMClient(settings_for(silent, max_concurrency=7)).capacity() == 7
    props = make_server([], routes={"/props": {"total_slots": 4}})
    capped = settings_for(props, max_concurrency=2)  # an explicit setting still caps it
    assert await LLMClient(capped).capacity() == 2


def test_prefix_stats_equal_a_byte_comparison_of_the_whole_prompts() -> None:
    import json
    import os

    from apr_graph import AprSettings
    from apr_graph.inputs import prefix_stats
    from apr_graph.plan import normalise_plan
    from apr_graph.plan_schema import Plan
    from apr_graph.prompts import shared_system, worker_messages

    for count in (1, 2, 9):
        subtasks = [{"id": f"s{i}", "goal": f"goal é {i} " * (i + 1)} for i in range(count)]
        plan = normalise_plan(
            Plan(strategy="parallel", subtasks=subtasks), AprSettings(max_threads=10)
        )
        prompts = [
            json.dumps(
                worker_messages("task ü", "ctx", plan["merge"], s), ensure_ascii=False
            ).encode()
            for s in plan["subtasks"]
        ]
        stats = prefix_stats("task ü", "ctx", plan, shared_system("task ü", "ctx"))
        assert stats["shared_chars"] == len(os.path.commonprefix(prompts))  # noqa: RUF071
        assert stats["shortest_prompt_chars"] == min(len(p) for p in prompts)
