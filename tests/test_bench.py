"""The benchmark harness itself (benchmarks are not tests, but their harness must not rot)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from apr_graph import AprSettings, LLMClient
from apr_graph.bench.main import main
from apr_graph.bench.suites import check_countdown, make_suite, safe_eval
from apr_graph.testing import Reply
from apr_graph.testing.simulated import LatencyModel, SimulatedServer


def test_countdown_answers_are_evaluated_not_trusted() -> None:
    task = make_suite("countdown", 1, seed=3)[0]
    numbers, target = task.meta["numbers"], task.meta["target"]
    assert task.check(f"Final answer: {task.meta['solution']}")
    assert not task.check(f"Final answer: {target}")  # a bare number is not an expression
    assert not check_countdown(f"{numbers[0]} * 1000", numbers, target)
    reused = f"({numbers[0]} + {numbers[0]}) * {numbers[1]}"
    assert not check_countdown(reused, [numbers[0], numbers[1]], int(safe_eval(reused)[0]))
    with pytest.raises(ValueError, match="not allowed"):
        safe_eval("__import__('os')")


def test_arithmetic_needs_every_result_in_order() -> None:
    task = make_suite("arithmetic", 1, parts=3)[0]
    assert task.check(" then ".join(task.expected))
    assert not task.check(" then ".join(reversed(task.expected)))


async def test_simulated_server_batches_and_caches() -> None:
    latency = LatencyModel(step_s=0.01)
    with SimulatedServer(lambda r: Reply(content=" ".join(["w"] * 30)), latency=latency) as server:
        client = LLMClient(AprSettings(base_url=server.base_url, max_concurrency=64))
        message = [{"role": "user", "content": "shared prefix " * 40}]
        started = time.perf_counter()
        await client.chat(message, role="worker", stream=True)
        alone = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*[client.chat(message, role="worker", stream=True) for _ in range(8)])
        eight = time.perf_counter() - started
        await client.aclose()
        stats = server.stats
    assert alone >= 30 * 0.01  # 30 decode steps at least
    assert eight < 2 * alone  # continuous batching: 8 at once cost far less than 8 in a row
    assert stats["peak_batch"] == 8
    assert stats["cached_tokens"] >= 7 * 64  # the shared prefix was prefilled once


def test_bench_harness_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every suite and strategy, on a fast simulated server: rows, accuracy, calls, tables.
    out = tmp_path / "bench"
    fast = ["--step-ms", "0.5", "--reasoning", "10", "--scaling", "", "--overhead", ""]
    code = main(["--tasks", "1", "--parts", "4", *fast, "--no-plots", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["suite"], r["strategy"]): r for r in results["suites"]}
    assert set(rows) == {
        (s, t)
        for s in ("arithmetic", "countdown", "control", "multipart")
        for t in ("sequential", "adaptive", "split", "native")
    }
    assert all(r["accuracy"] == 1.0 and r["correct"] == r["tasks"] == 1 for r in rows.values())
    assert all(r["errors"] == 0 and r["speedup_note"] == "" for r in rows.values())
    assert all(
        r["parts_correct"] == r["parts_total"] == 4
        for (s, _), r in rows.items()
        if s in {"arithmetic", "multipart"}
    )
    assert rows[("arithmetic", "sequential")]["speedup"] == 1.0
    assert rows[("control", "adaptive")]["model_calls"] == 1  # control: direct answer
    assert rows[("control", "split")]["model_calls"] == 5
    assert rows[("arithmetic", "native")]["model_calls"] == 6  # main, 4 threads, continuation
    native = next(o for o in results["outcomes"] if o["strategy"] == "native")
    assert [span["label"] for span in native["timeline"]][::5] == ["native", "native"]
    # plan, a thread per part, a merge unless the parts are put side by side
    assert rows[("multipart", "adaptive")]["model_calls"] in {5, 6}
    assert "overhead" not in results  # measured on its own below
    assert "scaling" not in results
    table = (out / "results.md").read_text()
    assert "| multipart | adaptive | 1/1 (1.00, 95% CI 0.21-1.00) | " in table
    # How busy the machine was, and how long the run took, beside the figures.
    machine = results["machine"]
    assert machine["load_before"] >= 0
    assert machine["load_after"] >= 0
    assert machine["duration_s"] > 0
    assert re.search(r"; load average [\d.]+ before, [\d.]+ after; \d+ s\n", table)
    captured = capsys.readouterr()
    # Not on a terminal: a progress line per finished step, with its outcome.
    steps = [line for line in captured.err.splitlines() if line.startswith("apr bench: ")]
    assert len(steps) == 16
    assert re.fullmatch(r"apr bench: 16/16 multipart-0 \w+ right \d+\.\ds \(\d+s\)", steps[-1])
    printed = [line for line in captured.out.splitlines() if line.strip()]
    assert printed[0].split() == [
        *("suite", "strategy", "accuracy", "speedup", "parts", "right", "errors", "wall", "s")
    ]
    assert any(
        re.match(r"multipart +adaptive +1/1 \(1\.00, 95% CI 0\.21-1\.00\) +\d+\.\d\dx +4/4", line)
        for line in printed
    )


def test_bench_speedups_and_scaling(tmp_path: Path) -> None:
    # Timing, on the suite where parallel parts pay off: decoding must outweigh overhead.
    out = tmp_path / "bench"
    code = main(
        [
            *("--suites", "arithmetic", "--strategies", "sequential,adaptive,native"),
            *("--tasks", "1", "--parts", "4", "--step-ms", "4", "--reasoning", "40"),
            *("--scaling", "4", "--scaling-tasks", "1", "--overhead", ""),
            *("--no-plots", "--out", str(out)),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["strategy"]: r for r in results["suites"]}
    assert rows["sequential"]["speedup"] == 1.0
    assert rows["adaptive"]["speedup"] > 1.2  # parallel parts pay off
    assert rows["native"]["speedup"] > 1.2  # forked at the model's outlines
    (scaling,) = results["scaling"]
    assert (scaling["threads"], scaling["tasks"], scaling["adaptive_correct"]) == (4, 1, 1)
    assert 0 < scaling["fraction_of_ideal"] <= 1.2
    # The simulated server's batched steps are slower: its ideal is lower, by that much.
    slowdown = results["simulation"]["batch_slowdown"]
    bound = scaling["ideal_speedup"] / (1 + slowdown * 3)
    assert scaling["server_ideal_speedup"] == pytest.approx(bound, abs=0.01)
    assert scaling["fraction_of_server_ideal"] > scaling["fraction_of_ideal"]
    assert (
        "| 4 | 1/1 (1.00, 95% CI 0.21-1.00) | 1/1 (1.00, 95% CI 0.21-1.00) | "
        in (out / "results.md").read_text()
    )


def test_bench_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(
        [
            *("--suites", "control", "--strategies", "sequential,adaptive", "--tasks", "1"),
            *("--step-ms", "0.5", "--reasoning", "5", "--scaling", "", "--overhead", ""),
            *("--out", str(out)),
        ]
    )
    assert code == 0
    for name in ("results.md", "speedup.png", "accuracy.png", "timeline.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--step-ms", "0"], "--step-ms: must be more than 0"),  # the sim would never step
        (["--suites", "arithmetic,trivia"], "--suites: unknown trivia; choose from"),
        (["--strategies", "fastest"], "--strategies: unknown fastest"),
        (["--parts", "1"], "a multipart question needs at least 2 parts"),
        (["--overhead-rounds", "0"], "--overhead-rounds"),
        (["--overhead-gc", "later"], "--overhead-gc: invalid choice"),
        (["--overhead-chunks", "0"], "--overhead-chunks"),
    ],
)
def test_bench_refuses_bad_options_before_running(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_overhead_forks_as_planned_whatever_the_decision_s_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from apr_graph.bench.overhead import measure_overhead

    for name in ("APR_ROUTER", "APR_LEARN_SPEED", "APR_PREFER"):  # the defaults, as for a user
        monkeypatch.delenv(name)
    rows = asyncio.run(measure_overhead([4], reply_s=0.05, rounds=1))
    assert rows[0]["apr_cpu_ms"] > 0  # the run forked into its 4 threads (it asserts that)


def test_overhead_can_be_measured_without_the_collector() -> None:
    import gc

    from apr_graph.bench.overhead import measure_overhead

    enabled_while_measuring: list[bool] = []
    assert gc.isenabled()
    rows = asyncio.run(
        measure_overhead(
            [2],
            reply_s=0.05,
            rounds=2,
            collector=False,
            progress=lambda _: enabled_while_measuring.append(gc.isenabled()),
        )
    )
    assert enabled_while_measuring == [False, False]
    assert rows[0]["chunks"] == 5
    assert gc.isenabled()  # given back as it was
    assert rows[0]["gc"] is False
    assert rows[0]["apr_full_gcs"] == 0
    assert rows[0]["apr_cpu_ms"] > 0


def test_overhead_with_long_replies_streams_every_chunk_to_every_layer() -> None:
    from apr_graph.bench.overhead import LAYERS, measure_overhead

    def measure(chunks: int) -> dict[str, Any]:  # no collections: no 0.1-s spikes
        return asyncio.run(
            measure_overhead([2], reply_s=0.05, rounds=1, chunks=chunks, collector=False)
        )[0]

    short, long = measure(5), measure(200)
    assert long["chunks"] == 200
    # 40 times the chunks in the same time: every layer read them all, and it cost more
    for layer in ("floor", "aiohttp", "apr"):
        assert long[f"{layer}_cpu_ms"] > short[f"{layer}_cpu_ms"], layer
    assert set(LAYERS) <= {k.removesuffix("_cpu_ms") for k in long if k.endswith("_cpu_ms")}


def test_overhead_is_measured_for_every_layer() -> None:
    from apr_graph.bench.overhead import LAYERS, measure_overhead

    said: list[str] = []
    rows = asyncio.run(measure_overhead([1, 4], reply_s=0.05, rounds=2, progress=said.append))
    assert [r["threads"] for r in rows] == [1, 4]
    assert said == [f"overhead {n} threads, round {r}/2" for n in (1, 4) for r in (1, 2)]
    for row in rows:
        assert row["rounds"] == 2
        assert row["gc"] is True
        for layer in LAYERS:
            assert row[f"{layer}_cpu_ms"] > 0
            assert row[f"{layer}_wall_s"] >= 0.05  # every layer waited for its replies
        assert row["apr_vs_floor"] == pytest.approx(
            row["apr_cpu_ms"] / row["floor_cpu_ms"], rel=0.01
        )
        assert row["apr_vs_aiohttp"] == pytest.approx(
            row["apr_cpu_ms"] / row["aiohttp_cpu_ms"], rel=0.01
        )
        assert row["langgraph_vs_aiohttp"] == pytest.approx(
            row["langgraph_aiohttp_cpu_ms"] / row["aiohttp_cpu_ms"], rel=0.01
        )
        assert isinstance(row["apr_full_gcs"], int)
        assert row["apr_full_gcs"] >= 0
        for ratio, layer in (("ideal_ratio", "apr"), ("floor_ideal_ratio", "floor")):
            assert row[ratio] == pytest.approx(0.05 / row[f"{layer}_wall_s"], abs=0.01)


async def test_the_overhead_server_plans_as_the_schema_asks_and_floors_send_aprs_bytes() -> None:
    from apr_graph import compile_apr_graph
    from apr_graph.bench.overhead import _body
    from apr_graph.bench.overhead_server import TASK, reply_for
    from apr_graph.plan_schema import plan_json_schema
    from apr_graph.testing import Rule, ScriptedServer

    n = 3
    with ScriptedServer([Rule(reply=lambda request: reply_for(request, 0.01))]) as server:
        settings = AprSettings(
            base_url=server.base_url, model="m", max_threads=n, probe_capacity=False
        )
        out = await compile_apr_graph(settings=settings).ainvoke({"task": TASK.format(n=n)})
        (plan_request,) = server.chat_requests("planner")
        workers = server.chat_requests("worker")
    assert out["metrics"]["threads"] == n
    plan = json.loads(reply_for(plan_request, 0.01).text())
    parallel = plan_json_schema(n)["anyOf"][1]
    assert set(plan) <= set(parallel["properties"])
    assert set(parallel["required"]) <= set(plan)
    assert all(isinstance(goal, str) for goal in plan["subtasks"])  # goals, as the schema has it
    # The bare layers' request is the one apr-graph sent to the first thread, byte for byte.
    sent = [r.body for r in workers if r.body["messages"] == _body(n)["messages"]]
    assert len(sent) == 1
    assert json.dumps(sent[0], sort_keys=True) == json.dumps(_body(n), sort_keys=True)


@pytest.mark.parametrize(
    ("profile", "choice", "by"), [("cpu", "direct", "speed"), ("gpu", "parallel", "plan")]
)
def test_bench_calibrates_and_shows_the_decision_per_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    profile: str,
    choice: str,
    by: str,
) -> None:
    # The decision's defaults (the suite turns them off for scripted plans).
    for name, value in {"APR_ROUTER": "true", "APR_PREFER": "speed"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "bench"
    code = main(
        [
            *("--sim-profile", profile, "--calibrate", "--suites", "multipart"),
            *("--strategies", "sequential,adaptive", "--tasks", "2", "--parts", "3"),
            *("--step-ms", "2", "--reasoning", "60", "--scaling", "", "--overhead", ""),
            *("--no-plots", "--out", str(out)),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["speed_profile"]["decode_tps"]
    (row,) = results["decision"]
    assert (row["suite"], row["strategy"], row[choice]) == ("multipart", "adaptive", 2)
    assert row["by"] == f"{by} 2"
    assert row["agrees_with_label"] == ("2/2" if choice == "parallel" else "0/2")
    if choice == "parallel":  # the GPU-like server: forking pays, as predicted
        assert row["predicted_speedup"] > 1.5
        assert row["actual_speedup"] > 1.5
    assert "## The fork decision" in (out / "results.md").read_text()
    assert "decided by" in capsys.readouterr().out
