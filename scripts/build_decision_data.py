"""Build ``data/decision/``: the router's development data and its held-out evaluation data.

Sources are two public repositories read at pinned commits, from a bare git directory (what
``fetch github:...`` gives) or a plain checkout::

    python scripts/build_decision_data.py \\
        --sot /work/.mirror/imagination-research+sot/repo \\
        --gsm8k /work/.mirror/openai+grade-school-math/repo

Development data (training and threshold choice): SoT's LIMA router labels, copied as they are,
and GSM8K items built from the TRAIN split. Held-out data (evaluation only): SoT's Vicuna and
WizardLM router labels, and GSM8K items built from the TEST split. Deterministic: a fixed seed,
so re-running writes the same files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import subprocess
from pathlib import Path

__all__ = ["GSM8K_COMMIT", "SOT_COMMIT", "main", "multi_task"]

SOT_COMMIT = "54f506fee30b762f794321f56d9fc1daeac438bf"
GSM8K_COMMIT = "3101c7d5072418e28b9008a6636bde82a006892c"
SEED = 20240533  # fixed so the committed files can be rebuilt byte for byte
N_SINGLES = 300
N_MULTIS = 300
OUT = Path(__file__).resolve().parent.parent / "data" / "decision"

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_ORDINALS = ["First", "Second", "Third", "Fourth"]
# Lead-ins people put before a list of problems; none of them is the held-out instruction.
_LEADS = [
    "",
    "Solve each of these:",
    "Please answer the following {n} problems.",
    "Help me with my homework, {n} questions:",
    "Work out each of these and give the answer as a number.",
    "Here are {n} word problems from my worksheet.",
    "Can you do these {n} for me?",
    "Answer all of the following.",
    "Quick maths check, {n} separate questions:",
]
# Prose joins: (opening, joiners before the 2nd, 3rd and 4th problem).
_PROSE = [
    ("Answer these {n} questions: ", ["Also, ", "And ", "Finally, "]),
    ("I have {n} questions. First: ", []),  # joined by ordinals
    ("Here are {n} unrelated problems. ", ["Next one: ", "Another: ", "Last one: "]),
    ("", ["Also, ", "Separately, ", "And one more: "]),
    ("Can you help with {n} things? ", ["The other one: ", "Then: ", "Lastly, "]),
]


def _read(source: Path, commit: str, path: str) -> str:
    """One file at the pinned commit (bare git dir), or from a plain checkout."""
    if (source / "HEAD").is_file() and (source / "objects").is_dir():
        shown = subprocess.run(
            ["git", "--git-dir", str(source), "show", f"{commit}:{path}"],
            check=True,
            capture_output=True,
        )
        return shown.stdout.decode("utf-8")
    return (source / path).read_text(encoding="utf-8")


def _router_rows(text: str) -> list[tuple[int, str]]:
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=";"))
    if rows[0] != ["label", "request"]:
        raise ValueError(f"unexpected SoT router header {rows[0]}")
    return [(int(label), request) for label, request in rows[1:]]


def _questions(text: str) -> list[str]:
    return [json.loads(line)["question"].strip() for line in text.splitlines() if line.strip()]


def _answers(text: str) -> list[str]:
    """Each problem's final answer: the number after GSM8K's ``####``."""
    return [
        json.loads(line)["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        for line in text.splitlines()
        if line.strip()
    ]


def multi_task(problems: list[str], style: str, rng: random.Random) -> str:
    """Join independent problems into one task in one of the ways people write such lists."""
    n = len(problems)
    word = _NUMBER_WORDS[n]
    sep = rng.choice(["\n", "\n", " ", "\n\n"])
    if style == "prose":
        opening, joiners = rng.choice(_PROSE)
        ordinal = "First" in opening
        pieces = [opening.format(n=word) + problems[0]]
        for i, problem in enumerate(problems[1:], start=1):
            if ordinal:
                joiner = f"{_ORDINALS[i]}: "
            else:  # the last problem gets the closing joiner ("Finally, ")
                joiner = joiners[-1] if i == n - 1 else joiners[i - 1]
            pieces.append(joiner + problem)
        return rng.choice([" ", "\n"]).join(pieces).strip()
    if style == "paren":
        labels = [f"({i + 1})" for i in range(n)]
    elif style == "dot":
        labels = [f"{i + 1}." for i in range(n)]
        sep = "\n"  # "1. ... 2. ..." inline reads as decimals; people break the line
    elif style == "letter":
        labels = [f"({'abcd'[i]})" for i in range(n)]
    else:  # heading
        name = rng.choice(["Problem", "Question", "Q"])
        labels = [f"{name} {i + 1}:" for i in range(n)]
    lead = rng.choice(_LEADS).format(n=word)
    items = sep.join(f"{label} {problem}" for label, problem in zip(labels, problems, strict=True))
    return f"{lead}{sep}{items}" if lead else items


def _write_jsonl(name: str, rows: list[dict[str, object]]) -> None:
    with (OUT / name).open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    ones = sum(1 for row in rows if row["label"] == 1)
    print(f"{name}: {len(rows)} rows, {ones} labelled 1")


def main() -> None:
    """Write every file of ``data/decision/`` except README.md and figures.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sot", type=Path, required=True, help="imagination-research/sot")
    parser.add_argument("--gsm8k", type=Path, required=True, help="openai/grade-school-math")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    # Development: LIMA labels copied byte for byte (columns label;request, as SoT ships them).
    lima = _read(args.sot, SOT_COMMIT, "data/lima/router.csv")
    (OUT / "sot_lima_router.csv").write_bytes(lima.encode("utf-8"))
    print(f"sot_lima_router.csv: {len(_router_rows(lima))} rows")

    rng = random.Random(SEED)
    train = _questions(_read(args.gsm8k, GSM8K_COMMIT, "grade_school_math/data/train.jsonl"))
    # Disjoint problems for singles and multis: a problem is never both a 0 and part of a 1.
    picked = rng.sample(range(len(train)), N_SINGLES + 4 * N_MULTIS)
    singles, pool = picked[:N_SINGLES], picked[N_SINGLES:]
    dev: list[dict[str, object]] = [
        {"prompt": train[i], "label": 0, "source": f"gsm8k-train-single:{i}"} for i in singles
    ]
    styles = ["paren", "dot", "letter", "heading", "prose"]
    for k in range(N_MULTIS):
        n = rng.choice([2, 3, 3, 4])
        ids, pool = pool[:n], pool[n:]
        style = styles[k % len(styles)]
        prompt = multi_task([train[i] for i in ids], style, rng)
        source = f"gsm8k-train-multi-{style}:" + ",".join(map(str, ids))
        dev.append({"prompt": prompt, "label": 1, "source": source})
    _write_jsonl("gsm8k_train_dev.jsonl", dev)

    # Held out: never read by the trainer.
    for name in ("vicuna", "wizardlm"):
        rows = _router_rows(_read(args.sot, SOT_COMMIT, f"data/{name}/router.csv"))
        _write_jsonl(
            f"heldout_sot_{name}.jsonl",
            [
                {"prompt": p, "label": y, "source": f"sot-{name}:{i}"}
                for i, (y, p) in enumerate(rows)
            ],
        )
    test_text = _read(args.gsm8k, GSM8K_COMMIT, "grade_school_math/data/test.jsonl")
    test, answers = _questions(test_text), _answers(test_text)
    held: list[dict[str, object]] = [
        {
            "prompt": test[i],
            "label": 0,
            "source": f"gsm8k-test-single:{i}",
            "answers": [answers[i]],
        }
        for i in range(8)
    ]
    for start in range(8, 20, 3):
        body = "\n".join(f"({j + 1}) {test[start + j]}" for j in range(3))
        prompt = "Solve these three independent problems. Give each answer as a number.\n" + body
        source = f"gsm8k-test-triple:{start},{start + 1},{start + 2}"
        held.append(
            {
                "prompt": prompt,
                "label": 1,
                "source": source,
                "answers": answers[start : start + 3],
            }
        )
    _write_jsonl("heldout_gsm8k_test.jsonl", held)


if __name__ == "__main__":
    main()
