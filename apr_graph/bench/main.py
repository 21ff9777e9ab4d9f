"""apr bench: speed and accuracy of the strategies, side by side, on local task suites.

Runs sequential chain-of-thought, adaptive apr-graph, a fixed split and the native mode on the
same backend and tasks, interleaved, and writes JSON, Markdown and PNG reports. Backends: a
simulated GPU server (default), a server of yours (--backend url), or the embedded model.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from apr_graph.bench.overhead import measure_overhead
from apr_graph.bench.report import decision_table, suite_table, text_table, write_report
from apr_graph.bench.runner import decision_rows, run_tasks, scaling_rows, summarise, warm_up
from apr_graph.bench.simmodel import SimModel
from apr_graph.bench.strategies import STRATEGIES
from apr_graph.bench.suites import SUITES, Task, make_suite
from apr_graph.cli_local import LocalChoice, add_local_options, choose_local
from apr_graph.decide import speed_store
from apr_graph.errors import InputError
from apr_graph.llm import LLMClient
from apr_graph.local import LocalBackendError, LocalServer
from apr_graph.settings import AprSettings
from apr_graph.speed import calibrate
from apr_graph.speed_store import profile_key
from apr_graph.testing.simulated import LatencyModel, SimulatedServer

__all__ = ["main", "parser"]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def parser() -> argparse.ArgumentParser:
    """The command line of ``apr bench``."""
    p = argparse.ArgumentParser(prog="apr bench", description=__doc__)
    p.add_argument(
        "--backend",
        choices=["sim", "local", "url"],
        default="sim",
        help="sim: simulated GPU server; local: a GGUF model run here; url: --base-url",
    )
    p.add_argument("--base-url", help="OpenAI-compatible endpoint (with --backend url)")
    p.add_argument("--model", default=None, help="model name (with --backend url)")
    p.add_argument("--api-key", default=None, help="API key (with --backend url)")
    p.add_argument("--suites", default=",".join(SUITES), help="comma list [%(default)s]")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="[%(default)s]")
    p.add_argument("--tasks", type=_positive(int), default=5, help="tasks per suite [%(default)s]")
    p.add_argument(
        "--parts",
        type=_positive(int),
        default=4,
        help="sub-questions per arithmetic and multipart task [%(default)s]",
    )
    p.add_argument("--points", type=int, default=4, help="fixed fan-out of 'split' [4]")
    p.add_argument(
        "--scaling",
        default="2,4,8,16",
        help="widths for achieved-vs-ideal speedup; empty to skip [%(default)s]",
    )
    p.add_argument(
        "--scaling-tasks",
        type=_positive(int),
        default=3,
        help="tasks per width of --scaling [%(default)s]",
    )
    p.add_argument(
        "--overhead",
        default="1,8,64,512,1000",
        help="fan-out sizes for framework overhead; empty to skip [%(default)s]",
    )
    p.add_argument(
        "--overhead-rounds",
        type=_positive(int),
        default=3,
        help="interleaved rounds per overhead size; the median is reported [%(default)s]",
    )
    p.add_argument(
        "--overhead-chunks",
        type=_positive(int),
        default=5,
        help="streamed chunks (tokens) in each worker reply of the overhead rounds; a long "
        "reply (e.g. 1000) shows what a streamed token costs each layer [%(default)s]",
    )
    p.add_argument(
        "--overhead-gc",
        choices=("on", "off"),
        default="on",
        help="the garbage collector during the overhead rounds: on, as a program runs; off "
        "to compare the layers' own code, without the full collections that fall in some "
        "rounds and not others [%(default)s]",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sim-profile",
        choices=("gpu", "cpu"),
        default="gpu",
        help="sim: a GPU server that batches (4 streams ~3.9x one) or a 2-core CPU server "
        "with 4 slots (4 streams 1.37x one, slow prefill) [%(default)s]",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the endpoint first (as apr calibrate does) and keep its speed profile "
        "(the sim's in OUT/speed.json), so the adaptive runs decide with it",
    )
    p.add_argument(
        "--step-ms",
        type=_positive(float),
        default=20.0,
        help="sim: milliseconds per decode step [%(default)s]",
    )
    p.add_argument(
        "--reasoning",
        type=int,
        default=100,
        help="sim: tokens of reasoning per part of a task [%(default)s]",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="[%(default)s]")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_local_options(p)
    return p


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": _load(),
    }


def _load() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): a busy machine
    makes every latency figure worse, so a report says how busy it was."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


async def _bench(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    suites = [s for s in args.suites.split(",") if s]
    strategies = [s for s in args.strategies.split(",") if s]
    tasks: list[Task] = [
        t for s in suites for t in make_suite(s, args.tasks, seed=args.seed, parts=args.parts)
    ]
    widths = _ints(args.scaling) if args.backend == "sim" else []
    sizes = _ints(args.overhead) if args.backend == "sim" else []
    scaling_tasks = {
        w: make_suite("arithmetic", args.scaling_tasks, seed=args.seed + w, parts=w) for w in widths
    }
    total = len(tasks) * len(strategies) + sum(len(t) * 2 for t in scaling_tasks.values())
    steps = total + len(sizes) * args.overhead_rounds  # an overhead round is a step
    bar = progress.add_task("benchmark", total=steps)

    started = time.monotonic()
    plain = not progress.console.is_terminal  # the bar shows only on a terminal
    done = 0

    local_server: LocalServer | None = None

    def step(label: str) -> None:
        nonlocal done
        # A local server that died makes every later task a "connection error": stop, name it.
        if local_server is not None and (crashed := local_server.crash_error()) is not None:
            raise crashed
        done += 1
        progress.update(bar, advance=1, description=label)
        if plain:  # a line per step instead, for logs and redirected runs
            elapsed = time.monotonic() - started
            print(
                f"apr bench: {done}/{steps} {label} ({elapsed:.0f}s)",
                file=sys.stderr,
                flush=True,
            )

    results: dict[str, Any] = {
        "backend": args.backend,
        "command": "apr bench "
        + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "machine": _machine(),
        "simulation": {
            "step_ms": args.step_ms,
            "batch_slowdown": LatencyModel.batch_slowdown,
            "reasoning_tokens_per_part": args.reasoning,
            "profile": args.sim_profile,
        }
        if args.backend == "sim"
        else None,
    }
    async with AsyncExitStack() as stack:
        settings, local_server = await _backend(
            args, stack, tasks + [t for v in scaling_tasks.values() for t in v]
        )
        results["settings"] = settings.model_dump(mode="json", exclude={"api_key"})
        client = LLMClient(settings)
        stack.push_async_callback(client.aclose)
        await warm_up(client)
        if args.calibrate:
            profile = await calibrate(
                client, on_progress=lambda line: print(f"apr bench: {line}", file=sys.stderr)
            )
            speed_store(settings).put(profile_key(settings, client.base_url), profile)
            results["speed_profile"] = profile.to_json()
        outcomes = await run_tasks(client, tasks, strategies, points=args.points, progress=step)
        results["suites"] = summarise(outcomes)
        results["decision"] = decision_rows(outcomes, tasks)
        results["outcomes"] = [o.as_dict() for o in outcomes]
        widest = max(
            (o for o in outcomes if o.strategy == "adaptive"),
            key=lambda o: len(o.timeline),
            default=None,
        )
        if widest is not None:
            results["timeline"], results["timeline_task"] = widest.timeline, widest.task_id
        if widths:
            rows, _ = await scaling_rows(
                client,
                widths,
                tasks_per_width=args.scaling_tasks,
                seed=args.seed,
                progress=step,
                make_tasks=lambda w: scaling_tasks[w],
                batch_slowdown=LatencyModel.batch_slowdown,  # the simulated server's
            )
            results["scaling"] = rows
    if sizes:
        results["overhead"] = await measure_overhead(
            sizes,
            progress=step,
            rounds=args.overhead_rounds,
            collector=args.overhead_gc == "on",
            chunks=args.overhead_chunks,
        )
    results["machine"]["load_after"] = _load()
    results["machine"]["duration_s"] = round(time.monotonic() - started, 1)
    return results


async def _backend(
    args: argparse.Namespace, stack: AsyncExitStack, tasks: list[Task]
) -> tuple[AprSettings, LocalServer | None]:
    """The settings of the backend's client, and the local model server it started, if any."""
    if args.backend == "sim":
        if args.sim_profile == "cpu":  # scaled so that one decode step takes --step-ms
            latency = LatencyModel.cpu(scale=1000 / 23 / args.step_ms)
        else:
            latency = LatencyModel(step_s=args.step_ms / 1000)
        server = SimulatedServer(SimModel(tasks, reasoning=args.reasoning), latency=latency).start()
        stack.callback(server.stop)
        sim = AprSettings(
            base_url=server.base_url,
            model="sim",
            max_concurrency=64,
            max_threads=16,
            max_total_threads=64,
            # A simulated server's speed (a new port each run) belongs with its results.
            speed_file=str(args.out / "speed.json"),
        )
        return sim, None
    if args.backend == "local":
        local: LocalChoice = args.local
        running = stack.enter_context(local.server())
        settings, _ = local.settings(AprSettings(), running)  # the model's defaults, APR_* win
        return settings, running
    if not args.base_url:
        raise SystemExit("apr bench: error: --backend url needs --base-url")
    values: dict[str, Any] = {"base_url": args.base_url}
    if args.model:
        values["model"] = args.model
    if args.api_key:
        values["api_key"] = args.api_key
    return AprSettings(**values), None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``apr bench`` / ``python -m apr_graph.bench``."""
    cli = parser()
    args = cli.parse_args(argv)
    for option, names, known in (
        ("--suites", args.suites, SUITES),
        ("--strategies", args.strategies, STRATEGIES),
    ):
        unknown = [n for n in names.split(",") if n and n not in known]
        if unknown:
            cli.error(f"{option}: unknown {', '.join(unknown)}; choose from {','.join(known)}")
    if "multipart" in args.suites.split(",") and args.parts < 2:
        cli.error("--parts: a multipart question needs at least 2 parts")
    args.local = None
    if args.backend == "local":
        try:  # the model file is checked before anything starts
            args.local = choose_local(args)
        except (InputError, LocalBackendError) as exc:
            print(f"apr bench: error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, InputError) else 3  # apr's exit codes
        for line in args.local.notices():
            print(line, file=sys.stderr)
    columns = (
        TextColumn("{task.description:<32}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, transient=True) as progress:
            results = asyncio.run(_bench(args, progress))
    except LocalBackendError as exc:
        print(f"apr bench: error: {exc}", file=sys.stderr)
        return 3
    files = write_report(results, args.out, plots=not args.no_plots)
    shown = ("suite", "strategy", "accuracy", "speedup", "parts right", "errors")
    table = [
        {k: v for k, v in row.items() if k in shown} | {"wall s": row["wall median s"]}
        for row in suite_table(results.get("suites", []))
    ]
    print(text_table(table), end="")
    if results.get("decision"):
        print(text_table(decision_table(results["decision"])), end="")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
