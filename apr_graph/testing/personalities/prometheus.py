"""Prometheus text exposition, the format of ``/metrics`` on vLLM and llama.cpp."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Family", "c_double", "exposition", "python_float"]


@dataclass(frozen=True)
class Family:
    """One metric family: its name, type, help text and samples (labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)


def python_float(value: float) -> str:
    """A value as ``prometheus_client`` (vLLM) writes it: ``3.0``."""
    return repr(float(value))


def c_double(value: float) -> str:
    """A value as a C++ ``ostream`` (llama.cpp) writes it: ``3``, ``0.25``, ``1.5e+06``."""
    return f"{value:g}"


def exposition(families: Iterable[Family], number: Callable[[float], str] = python_float) -> str:
    """The text format: ``# HELP``, ``# TYPE``, then one line per sample, labels sorted."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            pairs = ",".join(f'{key}="{labels[key]}"' for key in sorted(labels))
            name = f"{family.name}{{{pairs}}}" if pairs else family.name
            lines.append(f"{name} {number(value)}")
    return "\n".join(lines) + "\n"
