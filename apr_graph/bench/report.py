"""Writing benchmark results: JSON (everything), Markdown tables, PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown", "write_report"]


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += [
        "| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    """The human-readable report."""
    machine = results["machine"]
    parts = [
        f"# apr-graph benchmark ({results['backend']})\n",
        f"Command: `{results['command']}`  \n"
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{machine['date']}\n",
    ]
    if results.get("simulation"):
        sim = results["simulation"]
        parts.append(
            f"Simulated GPU server: {sim['step_ms']} ms per decode step, "
            f"{sim['reasoning_tokens_per_part']} reasoning tokens per part of a task. "
            "Its scripted model knows the answers: accuracy here checks the plumbing, "
            "latency is the measurement.\n"
        )
    if results.get("suites"):
        parts += [
            "## Suites: accuracy, latency and tokens per strategy\n",
            _table(results["suites"]),
        ]
    if results.get("scaling"):
        parts += ["## Achieved vs ideal speedup (independent parts)\n", _table(results["scaling"])]
    if results.get("overhead"):
        parts += [
            "## Framework overhead per thread (zero-latency server)\n",
            _table(results["overhead"]),
        ]
    return "\n".join(parts)


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    rows = results.get("suites") or []
    if rows:
        suites = sorted({r["suite"] for r in rows})
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        for metric, name in (("speedup", "speedup.png"), ("accuracy", "accuracy.png")):
            fig, ax = plt.subplots(figsize=(7, 3.5))
            width = 0.8 / max(1, len(strategies))
            for i, strategy in enumerate(strategies):
                values = [
                    next(
                        (
                            r[metric] or 0
                            for r in rows
                            if r["suite"] == s and r["strategy"] == strategy
                        ),
                        0,
                    )
                    for s in suites
                ]
                ax.bar([x + i * width for x in range(len(suites))], values, width, label=strategy)
            ax.set_xticks([x + width * (len(strategies) - 1) / 2 for x in range(len(suites))])
            ax.set_xticklabels(suites)
            ax.set_ylabel(metric + (" over sequential (x)" if metric == "speedup" else ""))
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
    timeline = results.get("timeline")
    if timeline:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(timeline) + 1.2))
        for i, span in enumerate(timeline):
            ax.barh(i, span["end"] - span["start"], left=span["start"], height=0.6)
        ax.set_yticks(range(len(timeline)))
        ax.set_yticklabels([s["label"] for s in timeline])
        ax.invert_yaxis()
        ax.set_xlabel("seconds since the run started")
        ax.set_title(f"one adaptive run: {results.get('timeline_task', '')}")
        fig.tight_layout()
        fig.savefig(out / "timeline.png", dpi=110)
        plt.close(fig)
        written.append("timeline.png")
    return written


def write_report(results: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    files = [out / "results.json", out / "results.md"]
    if plots:
        files += [out / name for name in _plots(results, out)]
    return files
