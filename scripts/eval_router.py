"""Evaluate the shipped router (``apr_graph/router.json``) and write ``data/decision/figures.md``.

::

    PYTHONPATH=. python scripts/eval_router.py

The development row is the cross-validation figure recorded by the trainer; every other row
scores the held-out files, which neither the weights nor the threshold have seen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apr_graph.router import task_shape

__all__ = ["balanced_accuracy", "load_jsonl", "main", "table"]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "decision"
HELD_OUT = ("heldout_sot_vicuna.jsonl", "heldout_sot_wizardlm.jsonl", "heldout_gsm8k_test.jsonl")


def load_jsonl(name: str) -> list[dict[str, Any]]:
    """The rows of one file of ``data/decision/``."""
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def balanced_accuracy(labels: list[int], predicted: list[int]) -> float:
    """Mean of the recall on label 1 and the recall on label 0."""
    recalls = []
    for cls in (0, 1):
        seen = [p for y, p in zip(labels, predicted, strict=True) if y == cls]
        recalls.append(sum(p == cls for p in seen) / len(seen))
    return sum(recalls) / 2


def table() -> str:
    """The figures as a markdown table, with a line on what each row means."""
    model = json.loads((ROOT / "apr_graph" / "router.json").read_text(encoding="utf-8"))
    cv = model["provenance"]["dev_cv"]
    lines = [
        "# Router figures",
        "",
        "Written by `scripts/eval_router.py`. Threshold "
        f"{model['threshold']:.2f} (chosen by {cv['folds']}-fold CV on development data only).",
        "",
        "| set | n | label 1 | predicted parallel | balanced accuracy | GSM8K |",
        "|---|---|---|---|---|---|",
    ]
    for source in ("sot-lima", "gsm8k-train"):
        row = cv[source]
        lines.append(
            f"| dev CV: {source} | {row['n']} | {row['label_1']} | {row['predicted_1']} "
            f"| {row['balanced_accuracy']:.3f} | |"
        )
    lines.append(f"| **dev CV: all** | | | | **{cv['balanced_accuracy']:.3f}** | |")
    for name in HELD_OUT:
        rows = load_jsonl(name)
        labels = [int(r["label"]) for r in rows]
        predicted = [int(task_shape(r["prompt"]).splits) for r in rows]
        extra = ""
        if "gsm8k" in name:
            singles = [p for y, p in zip(labels, predicted, strict=True) if y == 0]
            triples = [p for y, p in zip(labels, predicted, strict=True) if y == 1]
            extra = (
                f"singles direct {singles.count(0)}/{len(singles)}, "
                f"triples parallel {sum(triples)}/{len(triples)}"
            )
        label = name.removesuffix(".jsonl").replace("heldout_", "held out: ")
        lines.append(
            f"| {label} | {len(rows)} | {sum(labels)} | {sum(predicted)} "
            f"| {balanced_accuracy(labels, predicted):.3f} | {extra} |"
        )
    lines += [
        "",
        "Dev CV figures are out-of-fold, at the threshold chosen on those same out-of-fold",
        "predictions (slightly optimistic). Held-out sets were never used for training, feature",
        "choice or the threshold.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Write figures.md and print it."""
    text = table()
    (DATA / "figures.md").write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
