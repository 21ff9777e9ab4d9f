"""Speed profiles: calibration against simulated servers, the store, learning from calls,
predictions, and ``apr calibrate``."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apr_graph.decide import after_plan, before_plan
from apr_graph.inputs import render_context
from apr_graph.llm import LLMClient
from apr_graph.plan import normalise_plan
from apr_graph.plan_schema import Plan
from apr_graph.settings import AprSettings
from apr_graph.speed import (
    SpeedProfile,
    SpeedStore,
    calibrate,
    default_speed_file,
    endpoint_key,
    predict_call_s,
    predict_plan_s,
)
from apr_graph.speed_store import CALIBRATION_WEIGHT
from apr_graph.state import CallRecord
from apr_graph.testing import RecordedRequest, Reply
from apr_graph.testing.simulated import LatencyModel, SimulatedServer
from tests.conftest import CliRunner, settings_for, stop_promptly

CPU_SCALE = 10.0
"""Ten times faster than the CPU it imitates: steps of 4 ms stay well above timer noise."""
GPU_SCALE = 4.0


def counting(request: RecordedRequest) -> Reply:
    """A model that counts for as long as it is allowed (``max_tokens`` words)."""
    allowed = int((request.body or {}).get("max_tokens") or 64)
    return Reply(content=" ".join(str(n) for n in range(1, allowed + 1)))


@pytest.fixture
def simulated() -> Iterator[list[SimulatedServer]]:
    started: list[SimulatedServer] = []
    yield started
    stop_promptly(list(started))


def start(started: list[SimulatedServer], latency: LatencyModel) -> SimulatedServer:
    server = SimulatedServer(counting, latency=latency).start()
    started.append(server)
    return server


def expected(latency: LatencyModel) -> SpeedProfile:
    """The profile a latency model implies, by arithmetic."""
    counts = [k for k in (1, 2, 3, 4) if k <= latency.slots]
    return SpeedProfile(
        decode_tps={k: k / latency.step_time(k) for k in counts},
        prefill_tps=1 / latency.prefill_s_per_token,
        first_token_s=latency.step_s,
        source="arithmetic",
    )


# -- calibration -----------------------------------------------------------------------------
async def test_calibrate_finds_little_gain_on_the_cpu(simulated: list[SimulatedServer]) -> None:
    server = start(simulated, LatencyModel.cpu(CPU_SCALE))
    lines: list[str] = []
    async with LLMClient(settings_for(server)) as client:
        profile = await calibrate(client, on_progress=lines.append)
    assert sorted(profile.decode_tps) == [1, 2, 4]
    assert profile.gain(4) == pytest.approx(1.37, rel=0.2)
    assert profile.gain(2) == pytest.approx(1.21, rel=0.2)
    assert profile.aggregate_tps(1) == pytest.approx(23 * CPU_SCALE, rel=0.2)
    assert profile.prefill_tps == pytest.approx(150 * CPU_SCALE, rel=0.2)
    assert profile.first_token_s is not None
    assert profile.first_token_s < 0.1
    assert profile.source.startswith("apr calibrate, ")
    assert len(lines) == 5  # latency, 1, 2 and 4 streams, prefill
    assert all(line.startswith("calibrate: ") for line in lines)


async def test_calibrate_finds_nearly_free_batching_on_the_gpu(
    simulated: list[SimulatedServer],
) -> None:
    server = start(simulated, LatencyModel.gpu(GPU_SCALE))
    async with LLMClient(settings_for(server)) as client:
        profile = await calibrate(client)
    assert profile.gain(4) >= 3
    assert profile.aggregate_tps(1) == pytest.approx(50 * GPU_SCALE, rel=0.2)


async def test_calibrate_refuses_a_model_that_stops_at_once(
    simulated: list[SimulatedServer],
) -> None:
    server = SimulatedServer(lambda r: Reply(content="1 2 3"), latency=LatencyModel.gpu(20))
    simulated.append(server.start())
    async with LLMClient(settings_for(server)) as client:
        with pytest.raises(Exception, match="stopped after 3 tokens"):
            await calibrate(client)


async def decode_s_beside_a_long_prompt(server: SimulatedServer) -> float:
    """Seconds a 40-token reply takes while a 1,000-word prompt arrives beside it."""
    async with LLMClient(settings_for(server)) as client:
        reply = client.start(
            client.chat([{"role": "user", "content": "go"}], role="worker", max_tokens=40)
        )
        await asyncio.sleep(0.02)
        words = " ".join(f"w{n}" for n in range(1000))
        await client.chat([{"role": "user", "content": words}], role="worker", max_tokens=1)
        done = await reply
    return done.ended_at - (done.first_token_at or done.started_at)


async def test_a_prompt_stalls_decoding_on_the_cpu_only(simulated: list[SimulatedServer]) -> None:
    cpu = LatencyModel.cpu(CPU_SCALE)
    stalled = await decode_s_beside_a_long_prompt(start(simulated, cpu))
    assert stalled > 1000 * cpu.prefill_s_per_token  # the decoder waited for the prefill
    gpu = LatencyModel.gpu(GPU_SCALE)
    beside = await decode_s_beside_a_long_prompt(start(simulated, gpu))
    assert beside < 40 * gpu.step_time(2) * 1.5  # prefill ran beside the decode steps


# -- the profile and the predictions -------------------------------------------------------
def test_aggregate_is_interpolated_and_flat_outside_what_was_measured() -> None:
    profile = SpeedProfile({2: 30.0, 4: 40.0}, None, None, "hand")
    assert profile.aggregate_tps(1) == 30.0  # no gain is assumed that was not measured
    assert profile.aggregate_tps(3) == 35.0
    assert profile.aggregate_tps(16) == 40.0
    assert profile.gain(4) == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="at least one"):
        SpeedProfile({}, None, None, "hand")


def test_predict_call_adds_latency_prefill_and_decoding() -> None:
    profile = SpeedProfile({1: 20.0, 4: 40.0}, 100.0, 0.5, "hand")
    seconds = predict_call_s(profile, prompt_tokens=300, output_tokens=100, cached_tokens=100)
    assert seconds == pytest.approx(0.5 + 2 + 5)
    assert predict_call_s(profile, prompt_tokens=0, output_tokens=100, streams=4) == 10.5


def test_plans_lose_on_the_cpu_and_win_on_the_gpu() -> None:
    def direct(profile: SpeedProfile) -> float:
        return predict_call_s(profile, prompt_tokens=100, output_tokens=600)

    def plan(profile: SpeedProfile, *, merge_tokens: int) -> float:
        return predict_plan_s(
            profile,
            prompt_tokens=100,
            plan_tokens=100,
            thread_prompt_tokens=300,
            thread_tokens=[200, 200, 200],
            width=4,
            merge_prompt_tokens=700,
            merge_tokens=merge_tokens,
        )

    cpu, gpu = expected(LatencyModel.cpu()), expected(LatencyModel.gpu())
    assert plan(cpu, merge_tokens=300) > 1.5 * direct(cpu)
    assert plan(cpu, merge_tokens=0) > direct(cpu)  # even a concat merge loses there
    assert direct(gpu) >= 1.8 * plan(gpu, merge_tokens=0)
    # Writing a 300-token synthesis costs as much as the threads save, even on a GPU.
    assert plan(gpu, merge_tokens=300) == pytest.approx(direct(gpu), rel=0.1)


def test_threads_beyond_the_width_wait_for_a_second_batch() -> None:
    profile = SpeedProfile({1: 10.0, 2: 20.0}, None, None, "hand")
    two = predict_plan_s(
        profile,
        prompt_tokens=0,
        plan_tokens=0,
        thread_prompt_tokens=0,
        thread_tokens=[100, 50, 100],
        width=2,
        merge_prompt_tokens=0,
        merge_tokens=0,
    )
    assert two == pytest.approx(10 + 10)  # [100, 50] at 10 tokens/s each, then [100]


# -- the store --------------------------------------------------------------------------------
CPU = SpeedProfile({1: 22.9, 2: 27.7, 4: 31.4}, 150.0, 0.2, "apr calibrate, test")


def test_store_round_trips_and_keeps_other_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "speed.json"
    SpeedStore(path).put("a", CPU)
    SpeedStore(path).put("b", SpeedProfile({1: 50.0}, None, None, "other"))
    store = SpeedStore(path)
    assert store.get("a") == CPU
    assert store.get("b") == SpeedProfile({1: 50.0}, None, None, "other")
    assert store.get("c") is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["speed.json"]  # no leftovers
    memory = SpeedStore(None)
    memory.put("a", CPU)
    assert memory.get("a") == CPU


def test_a_store_reads_its_file_once_until_another_process_changes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "speed.json"
    SpeedStore(path).put("a", CPU)
    store = SpeedStore(path)
    reads: list[Path] = []
    real = Path.read_text

    def counted(self: Path, *args: Any, **kwargs: Any) -> str:
        reads.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    assert store.get("a") == CPU
    assert store.get("a") == CPU
    assert len(reads) == 1
    SpeedStore(path).put("a", SpeedProfile({1: 50.0}, None, None, "calibrated elsewhere"))
    assert store.get("a") == SpeedProfile({1: 50.0}, None, None, "calibrated elsewhere")


def test_a_corrupt_file_warns_reads_empty_and_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "speed.json"
    path.write_text('{"endpoints": {"a": ')
    store = SpeedStore(path)
    with pytest.warns(UserWarning, match="is corrupt"):
        assert store.get("a") is None
    with pytest.warns(UserWarning, match="is corrupt"):
        store.put("b", CPU)
    assert store.get("b") == CPU
    assert (tmp_path / "speed.json.corrupt").read_text() == '{"endpoints": {"a": '


def test_an_unreadable_entry_spares_the_others(tmp_path: Path) -> None:
    path = tmp_path / "speed.json"
    path.write_text(json.dumps({"version": 1, "endpoints": {"bad": {"decode_tps": 3}}}))
    store = SpeedStore(path)
    store.put("good", CPU)
    with pytest.warns(UserWarning, match="unreadable"):
        assert store.get("bad") is None
    assert store.get("good") == CPU
    assert json.loads(path.read_text())["endpoints"]["bad"] == {"decode_tps": 3}


def test_where_profiles_are_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("APR_SPEED_FILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_speed_file() == tmp_path / "apr-graph" / "speed.json"
    monkeypatch.setenv("APR_SPEED_FILE", str(tmp_path / "mine.json"))
    assert default_speed_file() == tmp_path / "mine.json"
    assert endpoint_key("HTTP://Host:8000/v1/", "m") == endpoint_key("http://host:8000/v1", "m")
    assert endpoint_key("http://a/v1", "m") != endpoint_key("http://a/v1", "n")


# -- learning from calls ------------------------------------------------------------------------
def call(started: float, tokens: int, rate: float, prompt: int = 100) -> CallRecord:
    """A streamed call: first token after 0.5 s, then ``rate`` tokens/s."""
    return CallRecord(
        role="worker",
        thread_id=None,
        model="m",
        prompt_tokens=prompt,
        completion_tokens=tokens,
        cached_tokens=0,
        requests=1,
        started_at=started,
        ended_at=started + 0.5 + (tokens - 1) / rate,
        mode="text",
        first_token_at=started + 0.5,
    )


def run_calls() -> list[CallRecord]:
    """One call alone at 20 tokens/s, then four together at 8 tokens/s each."""
    return [call(0.0, 201, 20.0), *(call(20.0, 161, 8.0) for _ in range(4)), call(50, 3, 1.0)]


def test_observe_learns_a_profile_from_a_run() -> None:
    store = SpeedStore(None)
    profile = store.observe("e", run_calls())
    assert profile is not None
    assert profile.aggregate_tps(1) == pytest.approx(20.0)
    assert profile.aggregate_tps(4) == pytest.approx(32.0)
    assert profile.gain(4) == pytest.approx(1.6)
    assert profile.first_token_s == pytest.approx(0.5)
    assert profile.source == "observed in 6 calls"
    assert store.get("e") == profile
    assert store.observe("e", run_calls()).source == "observed in 12 calls"  # type: ignore[union-attr]
    assert SpeedStore(None).observe("e", [call(0.0, 3, 1.0)]) is None  # too short to time


def test_observe_learns_how_long_a_threads_answer_is() -> None:
    store = SpeedStore(None)
    ended = [call(0.0, 300, 20.0), call(0.0, 100, 20.0), call(0.0, 1024, 20.0)]
    ended[0]["finish_reason"] = ended[1]["finish_reason"] = "stop"
    ended[2]["finish_reason"] = "length"  # cut off: says nothing of what an answer takes
    profile = store.observe("e", ended)
    assert profile is not None
    assert profile.part_tokens == pytest.approx(200.0)
    assert profile.part_weight == 1.0
    # A thread cut at its limit and continued is one answer of both calls' length.
    continued = [
        {**ended[2], "thread_id": "s1"},
        {**ended[0], "thread_id": "s1", "completion_tokens": 76},
    ]
    assert SpeedStore(None).observe("f", [*continued, *ended[:2]]).part_tokens == pytest.approx(  # type: ignore[union-attr]
        (1100 + 300 + 100) / 3
    )
    assert store.get("e").part_tokens == pytest.approx(200.0)  # type: ignore[union-attr]
    for _ in range(30):  # later runs move it; the newest ten count
        profile = store.observe("e", [{**ended[0], "completion_tokens": 600}])
        assert profile is not None
    assert profile.part_tokens == pytest.approx(600.0, rel=0.02)
    assert profile.part_weight == pytest.approx(11.0)


def test_observe_learns_the_prefill_rate_from_long_prompts_that_waited_alone() -> None:
    store = SpeedStore(None)
    # 0.5 s of latency (the short call), then 2,000 uncached tokens in 10 s: 200 tokens/s.
    alone = {**call(100.0, 50, 20.0, prompt=2_100), "cached_tokens": 100}
    alone["first_token_at"] = 110.5
    alone["ended_at"] = 113.0
    # Two long prompts sent together share the compute: each alone would read half the rate.
    together = [{**call(200.0, 50, 20.0, prompt=2_000), "first_token_at": 220.5} for _ in "ab"]
    profile = store.observe("e", [call(0.0, 201, 20.0), alone, *together])
    assert profile is not None
    assert profile.prefill_tps == pytest.approx(200.0)
    assert profile.prefill_weight == 1.0
    # It is what the next prediction costs a long prompt at; a calibration outweighs a run.
    assert predict_call_s(profile, prompt_tokens=2_000, output_tokens=0) == pytest.approx(10.5)
    store.put("c", CPU)
    calibrated = store.observe("c", [alone])
    assert calibrated is not None
    learned = 2_000 / (10.5 - CPU.first_token_s)  # type: ignore[operator]
    assert calibrated.prefill_tps == pytest.approx(
        150.0 + (learned - 150.0) / (CALIBRATION_WEIGHT + 1)
    )


def test_the_decision_predicts_with_the_learned_answer_length() -> None:
    settings = AprSettings(prefer="speed", router=False)
    short = SpeedProfile({1: 20.0, 4: 24.0}, 200.0, 0.2, "measured", part_tokens=50.0)
    long = SpeedProfile({1: 20.0, 4: 24.0}, 200.0, 0.2, "measured", part_tokens=800.0)
    task = "Answer (a) one thing (b) another (c) a third"
    # Short answers: planning costs more than 1.2x on three threads saves. Long ones: the
    # same server's threads pay, so the plan is asked for.
    quick, _ = before_plan(task, "", settings, short, width=4, depth=0)
    assert quick is not None
    assert (quick["choice"], quick["by"]) == ("direct", "speed")
    slow, _ = before_plan(task, "", settings, long, width=4, depth=0)
    assert slow is None


def test_a_calibration_outweighs_a_few_runs() -> None:
    store = SpeedStore(None)
    store.put("e", CPU)
    first = store.observe("e", run_calls())
    assert first is not None
    moved = 1 / (CALIBRATION_WEIGHT + 1)
    assert first.aggregate_tps(1) == pytest.approx(22.9 + moved * (20.0 - 22.9))
    assert first.aggregate_tps(4) == pytest.approx(31.4 + moved * (32.0 - 31.4))
    assert first.source == "apr calibrate, test; observed in 6 calls since"
    for _ in range(60):
        latest = store.observe("e", run_calls())
    assert latest is not None
    assert latest.aggregate_tps(1) == pytest.approx(20.0, rel=0.01)  # a changed server
    assert math.isclose(latest.aggregate_tps(2), 27.7)  # never observed: unchanged


# -- apr calibrate -----------------------------------------------------------------------------
def test_apr_calibrate_json_stores_the_profile(
    simulated: list[SimulatedServer],
    run_cli: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    server = start(simulated, LatencyModel.gpu(GPU_SCALE))
    monkeypatch.setenv("APR_SPEED_FILE", str(tmp_path / "speed.json"))
    done = run_cli("calibrate", "--base-url", server.base_url, "--model", "test-model", "--json")
    assert done.code == 0, done.err
    printed = json.loads(done.out)
    key = endpoint_key(server.base_url, "test-model")
    assert printed["endpoint"] == key
    assert float(printed["decode_tps"]["4"]) / float(printed["decode_tps"]["1"]) >= 3
    stored = SpeedStore(tmp_path / "speed.json").get(key)
    assert stored is not None
    assert stored.to_json() == {k: v for k, v in printed.items() if k in stored.to_json()}
    assert "calibrate: 4 streams" in done.err


def test_apr_calibrate_prints_a_table(
    simulated: list[SimulatedServer],
    run_cli: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    server = start(simulated, LatencyModel.gpu(GPU_SCALE))
    monkeypatch.setenv("APR_SPEED_FILE", str(tmp_path / "speed.json"))
    done = run_cli("calibrate", "-q", "--base-url", server.base_url, "--model", "test-model")
    assert done.code == 0, done.err
    assert done.err == ""
    lines = done.out.splitlines()
    assert lines[0].split() == ["streams", "tokens/s", "gain"]
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "4"]
    assert lines[-1] == f"stored for {endpoint_key(server.base_url, 'test-model')} in " + str(
        tmp_path / "speed.json"
    )


def test_apr_calibrate_against_no_server_is_one_line(
    simulated: list[SimulatedServer], run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start(simulated, LatencyModel.gpu())
    url = server.base_url
    server.stop()
    monkeypatch.setenv("APR_MAX_RETRIES", "1")
    monkeypatch.setenv("APR_RETRY_MAX_WAIT_S", "0.1")
    done = run_cli("calibrate", "--base-url", url)
    assert done.code == 4
    assert done.err.strip().splitlines() == [done.err.strip()]
    assert done.err.startswith(f"apr: error: cannot connect to {url}")


def test_threads_that_read_only_their_documents_are_predicted_cheaper() -> None:
    """With named documents each thread prefills its own file, not all three."""
    profile = SpeedProfile({1: 20.0, 4: 24.0}, 200.0, 0.2, "measured", part_tokens=300.0)
    files = {f"{name}.py": f"# {name}\n" + "x = 1\n" * 1500 for name in ("calc", "data", "sample")}
    task = "Review (a) calc.py (b) data.py (c) sample.py"
    plan = normalise_plan(
        Plan.model_validate(
            {"strategy": "parallel", "merge": "concat", "subtasks": ["(a)", "(b)", "(c)"]}
        ),
        AprSettings(),
        task=task,
    )
    whole = render_context(files)

    def predicted(given: object, documents: str = "named") -> float:
        settings = AprSettings(prefer="speed", router=False, thread_documents=documents)
        record = after_plan(plan, task, whole, settings, profile, None, width=4, given=given)
        return record["predicted_parallel_s"]  # type: ignore[typeddict-item]

    as_documents, as_string = predicted(files), predicted(whole)
    assert as_documents < as_string - 30  # two files fewer per thread, at 200 tokens/s
    assert predicted(files, "all") == as_string
    # Before the plan, the labelled parts say which thread reads which file.
    settings = AprSettings(prefer="speed", router=False)
    split, _ = before_plan(task, whole, settings, profile, width=4, depth=0, given=files)
    whole_run, _ = before_plan(task, whole, settings, profile, width=4, depth=0, given=whole)
    assert whole_run is not None  # one call wins when every thread reads all three
    assert split is None or split["predicted_parallel_s"] < whole_run["predicted_parallel_s"]  # type: ignore[typeddict-item]


def test_the_planning_call_is_costed_with_what_the_planner_reads() -> None:
    """The planner reads each long document's beginning, and a task that maps over its
    documents has no planning call: the prediction before the plan counts what is sent."""
    profile = SpeedProfile({1: 20.0, 4: 21.0}, 200.0, 0.2, "measured", part_tokens=300.0)
    files = {f"{name}.py": f"# {name}\n" + "x = 1\n" * 1500 for name in ("calc", "data", "sample")}
    task = "Review (a) calc.py (b) data.py (c) sample.py"
    whole = render_context(files)

    def parallel_s(**overrides: Any) -> float:
        goals, planning = overrides.pop("goals", None), overrides.pop("planning", True)
        settings = AprSettings(prefer="speed", router=False, **overrides)
        record, _ = before_plan(
            task,
            whole,
            settings,
            profile,
            width=4,
            depth=0,
            given=files,
            goals=goals,
            planning=planning,
        )
        assert record is not None  # forking loses on this profile: the record has the figures
        return record["predicted_parallel_s"]  # type: ignore[typeddict-item]

    reads_all = parallel_s(planner_document_chars=None)
    reads_part = parallel_s()  # 600 characters of each file
    no_plan = parallel_s(goals=["(a) calc.py", "(b) data.py", "(c) sample.py"], planning=False)
    unread = (len(whole) - 3 * 600) // 4  # tokens of the documents the planner does not read
    assert reads_all - reads_part == pytest.approx(unread / 200.0, rel=0.05)
    assert no_plan < reads_part
