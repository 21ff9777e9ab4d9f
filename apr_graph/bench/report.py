"""Writing benchmark results: JSON (everything), Markdown tables, PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apr_graph.bench.quality import accuracy_text, speedup_text

__all__ = ["decision_table", "markdown", "suite_table", "text_table", "write_report"]


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += [
        "| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def suite_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The suites' rows as shown: accuracy with its interval beside every speedup, and a
    speedup at accuracy clearly below the baseline's shown as ``n/a (...)``."""
    return [
        {
            "suite": r["suite"],
            "strategy": r["strategy"],
            "accuracy": accuracy_text(r["correct"], r["tasks"]),
            "speedup": speedup_text(r["speedup"], r["speedup_note"]),
            "parts right": f"{r['parts_correct']}/{r['parts_total']}",
            "errors": str(r["errors"]),
            "wall median s": f"{r['wall_median_s']:.2f}",
            "wall p90 s": f"{r['wall_p90_s']:.2f}",
            "critical-path tokens": f"{r['critical_path_tokens']:g}",
            "total tokens": f"{r['total_tokens']:g}",
            "model calls": f"{r['model_calls']:g}",
        }
        for r in rows
    ]


def _scaling_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {
            "threads": str(r["threads"]),
            "sequential accuracy": accuracy_text(r["sequential_correct"], r["tasks"]),
            "adaptive accuracy": accuracy_text(r["adaptive_correct"], r["tasks"]),
            "achieved speedup": speedup_text(r["achieved_speedup"], r["speedup_note"]),
            "ideal speedup": speedup_text(r["ideal_speedup"]),
            "fraction of ideal": "n/a"
            if r["fraction_of_ideal"] is None
            else f"{r['fraction_of_ideal']:.2f}",
            **(
                {
                    "server's ideal": speedup_text(r["server_ideal_speedup"]),
                    "fraction of server's ideal": "n/a"
                    if r["fraction_of_server_ideal"] is None
                    else f"{r['fraction_of_server_ideal']:.2f}",
                }
                if "server_ideal_speedup" in r
                else {}
            ),
            "sequential wall s": f"{r['sequential_wall_s']:.2f}",
            "adaptive wall s": f"{r['adaptive_wall_s']:.2f}",
        }
        for r in rows
    ]


def decision_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The decision rows, formatted."""

    def speed(value: Any) -> str:
        return "n/a" if value is None else f"{value}x"

    return [
        {
            "suite": row["suite"],
            "strategy": row["strategy"],
            "direct": str(row["direct"]),
            "parallel": str(row["parallel"]),
            "decided by": row["by"],
            "agrees with label": row["agrees_with_label"],
            "predicted speedup": speed(row["predicted_speedup"]),
            "actual speedup": speed(row["actual_speedup"]),
        }
        for row in rows
    ]


def text_table(rows: Sequence[dict[str, str]]) -> str:
    """Rows of strings as aligned plain-text columns, for a terminal."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = [[k.ljust(widths[k]) for k in keys]]
    lines += [[r[k].ljust(widths[k]) for k in keys] for r in rows]
    return "\n".join("  ".join(cells).rstrip() for cells in lines) + "\n"


def _load_note(machine: dict[str, Any]) -> str:
    """``; load average 0.12 before, 1.85 after; 312 s`` (what the results record of it)."""
    before, after = machine.get("load_before"), machine.get("load_after")
    note = ""
    if before is not None:
        note += f"; load average {before} before"
        if after is not None:
            note += f", {after} after"
    if machine.get("duration_s") is not None:
        note += f"; {machine['duration_s']:.0f} s"
    return note


def markdown(results: dict[str, Any]) -> str:
    """The human-readable report."""
    machine = results["machine"]
    parts = [
        f"# apr-graph benchmark ({results['backend']})\n",
        f"Command: `{results['command']}`  \n"
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{machine['date']}{_load_note(machine)}\n",
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
            "Accuracy: tasks right, with a Wilson 95% interval; parts right counts each "
            "sub-question. Speedup: median wall clock of sequential over the strategy's, shown "
            "only at comparable accuracy (n/a when nothing was right or the accuracy is below "
            "sequential's 95% interval).\n",
            _table(suite_table(results["suites"])),
        ]
    if results.get("decision"):
        parts += [
            "## The fork decision\n",
            "What apr-graph chose per suite (direct: one call; parallel: threads), what decided "
            "it (router: the task reads as one piece; speed: forking was predicted not to pay "
            "on this server; model: the planner answered; plan: forked as planned), agreement "
            "with the suite's label, and the speedup over one sequential call its decision "
            "predicted (1.0 for a direct answer) beside the measured one (median).\n",
            _table(decision_table(results["decision"])),
        ]
    if results.get("scaling"):
        parts += [
            "## Achieved vs ideal speedup (independent parts)\n",
            "Ideal: sequential tokens over adaptive's critical-path tokens. Server's ideal (the "
            "simulated server): the same, with each token at the step time of all threads "
            "decoding together (a batch of k takes 1 + slowdown * (k - 1) times one step).\n",
            _table(_scaling_table(results["scaling"])),
        ]
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
        by_key = {(r["suite"], r["strategy"]): r for r in rows}
        width = 0.8 / max(1, len(strategies))
        for metric, name in (("speedup", "speedup.png"), ("accuracy", "accuracy.png")):
            fig, ax = plt.subplots(figsize=(7, 3.5))
            for i, strategy in enumerate(strategies):
                xs = [x + i * width for x in range(len(suites))]
                mine = [by_key.get((s, strategy)) for s in suites]
                values = [(r[metric] or 0) if r else 0 for r in mine]
                errors = None
                if metric == "accuracy":
                    errors = [
                        [r["accuracy"] - r["ci95_low"] if r else 0 for r in mine],
                        [r["ci95_high"] - r["accuracy"] if r else 0 for r in mine],
                    ]
                ax.bar(xs, values, width, yerr=errors, capsize=3, label=strategy)
                for x, r in zip(xs, mine, strict=True):
                    if metric == "speedup" and r and r["speedup"] is None:
                        # no bar: a speedup at clearly lower accuracy is not a win
                        ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom")
            ax.set_xticks([x + width * (len(strategies) - 1) / 2 for x in range(len(suites))])
            ax.set_xticklabels(suites)
            if metric == "speedup":
                ax.set_ylabel("speedup over sequential (x)")
                ax.set_title("n/a: nothing right, or accuracy below sequential's", fontsize=9)
            else:
                ax.set_ylabel("accuracy (whiskers: 95% CI)")
                ax.set_ylim(0, 1.05)
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
