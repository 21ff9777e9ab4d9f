"""The quality bar beside every speedup: accuracy with its 95% interval, and when a speedup
may be presented at all.

A speedup is a win only at comparable accuracy. A strategy that got nothing right, or whose
accuracy lies below the baseline's 95% interval, is fast at being wrong: its speedup is shown
as ``n/a`` with both accuracies, never as a number (a "224x speedup" at 0% accuracy was once
printed).
"""

from __future__ import annotations

import math

__all__ = ["accuracy_text", "not_a_win", "speedup_text", "wilson"]


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of ``correct`` out of ``total`` (95% with the default ``z``);
    unlike the normal approximation it stays inside 0-1 and is honest for a few tasks."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_text(correct: int, total: int) -> str:
    """``7/8 (0.88, 95% CI 0.53-0.98)``."""
    if total <= 0:
        return "0/0"
    low, high = wilson(correct, total)
    return f"{correct}/{total} ({correct / total:.2f}, 95% CI {low:.2f}-{high:.2f})"


def not_a_win(correct: int, total: int, base_correct: int, base_total: int) -> str | None:
    """Why a speedup with this accuracy must not be presented as a win, or None if it may.

    Nothing right, or an accuracy below the baseline's 95% interval (with 8 tasks against a
    baseline's 8/8: 5/8 or fewer; one miss in a handful of tasks is within the noise).
    """
    if total <= 0 or correct == 0:
        return f"accuracy {correct}/{total}"
    if base_total > 0 and correct / total < wilson(base_correct, base_total)[0]:
        return f"accuracy {correct}/{total}, below the baseline's {base_correct}/{base_total}"
    return None


def speedup_text(speedup: float | None, note: str = "") -> str:
    """A speedup for a table: ``2.66x``, or ``n/a (...)`` with the reason."""
    if note:
        return f"n/a ({note})"
    return "n/a" if speedup is None else f"{speedup:.2f}x"
