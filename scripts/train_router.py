"""Train the task-shape router and write ``apr_graph/router.json``.

Pure Python (no numpy, no scikit-learn), so anybody can reproduce the shipped file::

    PYTHONPATH=. python scripts/train_router.py

Logistic regression with L2 and class-balanced weights, fitted by L-BFGS, on the features of
``apr_graph.router.features``. Trained on the development data of ``data/decision/`` only (SoT's
LIMA router labels and GSM8K train items); the L2 strength and the decision threshold are chosen
by stratified k-fold cross-validation on that data to maximise balanced accuracy. The held-out
files (``heldout_*``) are never read here. Deterministic: re-running writes the same file.
"""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from apr_graph.router import FORMAT, features

__all__ = [
    "balanced_accuracy",
    "best_threshold",
    "fit_logistic",
    "folds",
    "load_dev",
    "main",
    "predict",
    "vectorise",
    "vocabulary",
]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "decision"
OUT = ROOT / "apr_graph" / "router.json"
K_FOLDS = 5
SEED = 33  # the number; any fixed seed makes the folds reproducible
L2_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
MIN_COUNT = 3  # an n-gram seen in fewer training tasks is noise, and would not be shipped
MAX_VOCAB = 20000
KEEP_ABOVE = 0.05  # |weight| below this moves a task's score by well under 0.01: not shipped
MAX_SHIPPED = 4000  # keeps router.json near 100 KB

Row = tuple[list[int], list[float]]
Example = tuple[str, int, str]


def load_dev() -> list[Example]:
    """The development data: (prompt, label, source) from LIMA's router labels, GSM8K train
    and our own general requests (``own_dev.jsonl``)."""
    examples: list[Example] = []
    with (DATA / "sot_lima_router.csv").open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=";")
        next(reader)  # label;request
        examples += [(request, int(label), "sot-lima") for label, request in reader]
    with (DATA / "gsm8k_train_dev.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            examples.append((row["prompt"], int(row["label"]), "gsm8k-train"))
    # Our own general requests: LIMA's labels say little about everyday list requests ("list
    # ten tips ...", where LIMA's "list" is mostly a programming list).
    with (DATA / "own_dev.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            examples.append((row["prompt"], int(row["label"]), "own"))
    return examples


def vocabulary(featurised: Sequence[dict[str, float]]) -> list[str]:
    """Feature names kept for training: structural ones always, n-grams seen in MIN_COUNT tasks."""
    counts = Counter(name for found in featurised for name in found)
    structural = sorted(name for name in counts if name.startswith("s:"))
    grams = [(n, c) for n, c in counts.items() if not n.startswith("s:") and c >= MIN_COUNT]
    grams.sort(key=lambda nc: (-nc[1], nc[0]))
    return structural + sorted(n for n, _ in grams[:MAX_VOCAB])


def vectorise(featurised: Sequence[dict[str, float]], names: Sequence[str]) -> list[Row]:
    """Sparse rows (indices, values) over the given feature names."""
    index = {name: i for i, name in enumerate(names)}
    rows: list[Row] = []
    for found in featurised:
        pairs = sorted((index[n], v) for n, v in found.items() if n in index and v)
        rows.append(([i for i, _ in pairs], [v for _, v in pairs]))
    return rows


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def fit_logistic(
    rows: Sequence[Row], labels: Sequence[int], n_features: int, l2: float, max_iter: int = 300
) -> tuple[list[float], float]:
    """Weights and bias minimising class-balanced mean log loss + l2/2 * |w|^2 (bias free).

    L-BFGS (memory 10) with a backtracking line search; stops when the loss changes by less
    than 1e-9 relative or the gradient is flat.
    """
    n = len(rows)
    per_class = Counter(labels)
    sample = [n / (2.0 * per_class[y]) / n for y in labels]  # sums to 1

    def loss_grad(theta: list[float]) -> tuple[float, list[float]]:
        w, b = theta[:-1], theta[-1]
        grad = [l2 * x for x in w] + [0.0]
        loss = 0.5 * l2 * _dot(w, w)
        for (idx, val), y, c in zip(rows, labels, sample, strict=True):
            z = b + sum(w[i] * v for i, v in zip(idx, val, strict=True))
            # log(1 + e^-z) for y=1 and log(1 + e^z) for y=0, without overflow
            m = -z if y else z
            loss += c * (max(m, 0.0) + math.log1p(math.exp(-abs(m))))
            g = c * (_sigmoid(z) - y)
            for i, v in zip(idx, val, strict=True):
                grad[i] += g * v
            grad[-1] += g
        return loss, grad

    theta = [0.0] * (n_features + 1)
    loss, grad = loss_grad(theta)
    history: list[tuple[list[float], list[float], float]] = []
    for _ in range(max_iter):
        q = grad[:]
        alphas = []
        for s, yv, rho in reversed(history):
            a = rho * _dot(s, q)
            alphas.append(a)
            q = [qi - a * yi for qi, yi in zip(q, yv, strict=True)]
        if history:
            s, yv, _ = history[-1]
            gamma = _dot(s, yv) / _dot(yv, yv)  # the usual scale of the initial Hessian guess
            q = [qi * gamma for qi in q]
        for (s, yv, rho), a in zip(history, reversed(alphas), strict=True):
            b = rho * _dot(yv, q)
            q = [qi + (a - b) * si for qi, si in zip(q, s, strict=True)]
        direction = [-qi for qi in q]
        slope = _dot(grad, direction)
        if slope >= 0:  # not a descent direction: forget the curvature and go downhill
            history.clear()
            direction = [-g for g in grad]
            slope = -_dot(grad, grad)
        step = 1.0
        while True:
            trial = [t + step * d for t, d in zip(theta, direction, strict=True)]
            new_loss, new_grad = loss_grad(trial)
            if new_loss <= loss + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s = [a - b for a, b in zip(trial, theta, strict=True)]
        yv = [a - b for a, b in zip(new_grad, grad, strict=True)]
        sy = _dot(s, yv)
        if sy > 1e-12:
            history = [*history[-9:], (s, yv, 1.0 / sy)]
        done = abs(loss - new_loss) <= 1e-9 * max(1.0, abs(loss))
        theta, loss, grad = trial, new_loss, new_grad
        if done or max(abs(g) for g in grad) < 1e-7:
            break
    return theta[:-1], theta[-1]


def predict(rows: Sequence[Row], weights: Sequence[float], bias: float) -> list[float]:
    """Probability of label 1 for each row."""
    return [
        _sigmoid(bias + sum(weights[i] * v for i, v in zip(idx, val, strict=True)))
        for idx, val in rows
    ]


def balanced_accuracy(labels: Sequence[int], predicted: Sequence[int]) -> float:
    """Mean of the recall on label 1 and the recall on label 0."""
    recalls = []
    for cls in (0, 1):
        seen = [p for y, p in zip(labels, predicted, strict=True) if y == cls]
        recalls.append(sum(p == cls for p in seen) / len(seen))
    return sum(recalls) / 2


def best_threshold(probs: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """The threshold on a 0.01 grid with the highest balanced accuracy, and that accuracy.

    Ties go to the threshold nearest 0.5: the plateau's middle is the least fitted choice.
    """
    scored = []
    for step in range(1, 100):
        t = step / 100
        ba = balanced_accuracy(labels, [int(p >= t) for p in probs])
        scored.append((round(ba, 6), -abs(t - 0.5), t))
    ba, _, t = max(scored)
    return t, ba


def folds(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """A fold number per example, stratified by label, from a seeded shuffle."""
    rng = random.Random(seed)
    fold = [0] * len(labels)
    for cls in (0, 1):
        members = [i for i, y in enumerate(labels) if y == cls]
        rng.shuffle(members)
        for rank, i in enumerate(members):
            fold[i] = rank % k
    return fold


def _out_of_fold(featurised: list[dict[str, float]], labels: list[int], l2: float) -> list[float]:
    fold = folds(labels, K_FOLDS, SEED)
    probs = [0.0] * len(labels)
    for f in range(K_FOLDS):
        train = [i for i in range(len(labels)) if fold[i] != f]
        test = [i for i in range(len(labels)) if fold[i] == f]
        names = vocabulary([featurised[i] for i in train])  # vocabulary from the fold's train
        w, b = fit_logistic(
            vectorise([featurised[i] for i in train], names),
            [labels[i] for i in train],
            len(names),
            l2,
        )
        held = predict(vectorise([featurised[i] for i in test], names), w, b)
        for i, p in zip(test, held, strict=True):
            probs[i] = p
    return probs


def _data_date() -> str:
    # The date of the development data's last commit, not today's: re-running gives the same file.
    try:
        shown = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", "data/decision"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return shown.stdout.strip() or "uncommitted"


def main() -> None:
    """Cross-validate, fit on all development data, prune and write router.json."""
    dev = load_dev()
    featurised = [features(prompt) for prompt, _, _ in dev]
    labels = [y for _, y, _ in dev]
    sources = [s for _, _, s in dev]
    print(f"development: {len(dev)} tasks, {sum(labels)} labelled 1")

    trials = []
    for l2 in L2_GRID:
        probs = _out_of_fold(featurised, labels, l2)
        t, ba = best_threshold(probs, labels)
        print(f"l2={l2:g}: {K_FOLDS}-fold CV balanced accuracy {ba:.3f} at threshold {t:.2f}")
        trials.append((round(ba, 4), l2, t, probs))
    ba, l2, threshold, probs = max(trials, key=lambda trial: trial[:2])  # ties: stronger L2

    cv: dict[str, object] = {"folds": K_FOLDS, "l2": l2, "balanced_accuracy": round(ba, 4)}
    for source in sorted(set(sources)):
        picked = [i for i, s in enumerate(sources) if s == source]
        ys = [labels[i] for i in picked]
        preds = [int(probs[i] >= threshold) for i in picked]
        cv[source] = {
            "n": len(picked),
            "label_1": sum(ys),
            "predicted_1": sum(preds),
            "balanced_accuracy": round(balanced_accuracy(ys, preds), 4),
        }
    at_half = balanced_accuracy(labels, [int(p >= 0.5) for p in probs])
    cv["balanced_accuracy_at_0.5"] = round(at_half, 4)

    names = vocabulary(featurised)
    rows = vectorise(featurised, names)
    weights, bias = fit_logistic(rows, labels, len(names), l2)
    ranked = sorted(
        ((name, w) for name, w in zip(names, weights, strict=True) if abs(w) >= KEEP_ABOVE),
        key=lambda nw: (-abs(nw[1]), nw[0]),
    )[:MAX_SHIPPED]
    shipped = {name: round(w, 4) for name, w in sorted(ranked)}
    full = [int(p >= threshold) for p in predict(rows, weights, bias)]
    pruned_w = [shipped.get(name, 0.0) for name in names]
    pruned = [int(p >= threshold) for p in predict(rows, pruned_w, round(bias, 4))]
    changed = sum(a != b for a, b in zip(full, pruned, strict=True))
    print(f"shipped {len(shipped)} of {len(names)} weights; {changed} dev decisions changed")

    model = {
        "format": FORMAT,
        "bias": round(bias, 4),
        "threshold": threshold,
        "features": {
            "ngrams": [1, 2],
            "lowercase": True,
            "numbers": "<num>",
            "values": "n-grams present = 1; structural counts as log1p",
            "min_count": MIN_COUNT,
            "max_vocab": MAX_VOCAB,
            "structural": sorted(n for n in names if n.startswith("s:")),
        },
        "provenance": {
            "trained_by": "scripts/train_router.py",
            "data": [
                "data/decision/sot_lima_router.csv (SoT's LIMA router labels, MIT)",
                "data/decision/gsm8k_train_dev.jsonl (GSM8K train: singles 0, multi-problem 1)",
            ],
            "data_date": _data_date(),
            "model": "logistic regression, L2, class-balanced weights, L-BFGS",
            "threshold_choice": "max out-of-fold balanced accuracy, 0.01 grid, development only",
            "dev_cv": cv,
            "pruning": f"|w| >= {KEEP_ABOVE}, at most {MAX_SHIPPED}; {changed} dev decisions moved",
            "vocabulary": len(names),
        },
        "weights": shipped,
    }
    OUT.write_text(json.dumps(model, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size / 1000:.0f} KB)")
    print(json.dumps(cv, indent=1))


if __name__ == "__main__":
    main()
