"""Reading GGUF headers, and the defaults chosen from them. No server, no model loaded."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from apr_graph import AprSettings
from apr_graph.gguf import GgufError, read_gguf
from apr_graph.local import LocalBackendError, bundled_model_path
from apr_graph.local_model import LocalModel, apply_local_defaults, local_defaults
from apr_graph.prompts import STEP_BY_STEP_SYSTEM

QWEN_15B = {
    "general.architecture": "qwen2",
    "general.name": "Qwen2.5 1.5B Instruct",
    "qwen2.context_length": 32768,
    "qwen2.block_count": 28,
    "qwen2.embedding_length": 1536,
    "qwen2.attention.head_count": 12,
    "qwen2.attention.head_count_kv": 2,
    "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "tokenizer.ggml.tokens": ["<|im_start|>", "<|im_end|>", "hello"],
    "tokenizer.ggml.token_type": [1, 1, 1],
}


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _value(value: Any) -> tuple[int, bytes]:
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return 10, struct.pack("<Q", value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    if isinstance(value, str):
        return 8, _string(value)
    kinds = {_value(item)[0] for item in value}
    kind = kinds.pop() if kinds else 4
    items = b"".join(_value(item)[1] for item in value)
    return 9, struct.pack("<IQ", kind, len(value)) + items


def write_gguf(
    path: Path,
    meta: dict[str, Any],
    tensors: Sequence[tuple[int, ...]] = ((1000, 1000),),
    *,
    version: int = 3,
    pad_to: int = 0,
) -> Path:
    """A GGUF file with ``meta`` and tensors of these shapes (weights: zeros, ``pad_to`` bytes)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta))
    for key, value in meta.items():
        kind, data = _value(value)
        out += _string(key) + struct.pack("<I", kind) + data
    for index, shape in enumerate(tensors):
        out += _string(f"t{index}") + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", 0, 0)
    path.write_bytes(out + b"\0" * max(0, pad_to - len(out)))
    return path


def test_the_header_gives_size_context_cache_and_template(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", QWEN_15B, [(1536, 151936), (1536, 1536), (8960,)])
    info = read_gguf(path)
    assert info.parameters == 1536 * 151936 + 1536 * 1536 + 8960  # counted from the tensors
    assert (info.name, info.architecture, info.context_length) == (
        "Qwen2.5 1.5B Instruct",
        "qwen2",
        32768,
    )
    assert info.kv_bytes_per_token == 2 * 28 * 2 * (1536 // 12) * 2  # K and V, f16
    assert info.has_chat_template
    assert info.file_bytes == path.stat().st_size


def test_a_declared_parameter_count_wins(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "m.gguf", {"general.parameter_count": 7_000_000_000}))
    assert info.parameters == 7_000_000_000
    assert info.context_length is None
    assert info.kv_bytes_per_token is None
    assert not info.has_chat_template


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"PK\x03\x04 a zip, or safetensors", "not a GGUF model file"),
        (b"GGUF" + struct.pack("<I", 1), "version 1 is not supported"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 5), "truncated"),
        (b"", "not a GGUF model file"),
    ],
)
def test_what_is_not_a_readable_gguf_says_why(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufError, match=expected):
        read_gguf(path)


def test_a_vocabulary_claiming_more_strings_than_the_file_holds_is_truncation(
    tmp_path: Path,
) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"tokenizer.ggml.tokens": ["a", "b"]})
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<IQ", 8, 2))
    data[at : at + 12] = struct.pack("<IQ", 8, 10**9)
    path.write_bytes(bytes(data))
    with pytest.raises(GgufError, match="truncated"):
        read_gguf(path)


def test_the_bundled_demo_model_is_read_as_tiny() -> None:
    model = LocalModel.open(None)
    assert model.bundled
    assert model.tiny
    assert model.alias == "smollm2"
    assert model.path == bundled_model_path()
    assert 130e6 < model.info.parameters < 140e6
    assert model.info.context_length == 8192
    assert model.info.has_chat_template


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing.gguf", "no such file"),
        (".", "is a folder"),
        ("notes.txt", "not a GGUF model file"),
    ],
)
def test_a_bad_model_path_is_a_local_backend_error(
    tmp_path: Path, name: str, expected: str
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LocalBackendError, match=expected) as caught:
        LocalModel.open(tmp_path / name)
    assert str(tmp_path) in str(caught.value)


def real_model(tmp_path: Path, *, file_bytes: int = 1_117_320_768) -> LocalModel:
    meta = {**QWEN_15B, "general.parameter_count": 1_543_714_304}
    # A sparse file: the size of the real Q4_K_M download, no disk used.
    path = write_gguf(tmp_path / "qwen2.5-1.5b-instruct-q4_k_m.gguf", meta)
    with path.open("r+b") as file:
        file.truncate(file_bytes)
    return LocalModel.open(path)


def test_a_real_model_gets_room_and_a_deadline_that_fits_its_size(tmp_path: Path) -> None:
    model = real_model(tmp_path)
    assert not model.tiny
    assert not model.bundled
    assert model.alias == "qwen2.5-1.5b-instruct-q4_k_m"
    assert model.describe() == "Qwen2.5 1.5B Instruct (1.54B parameters, 1.1 GB)"
    defaults = local_defaults(model, parallel=True)
    assert (defaults.slots, defaults.ctx_per_slot) == (4, 8192)
    assert defaults.settings["max_depth"] == 2
    assert defaults.settings["max_threads"] == 4
    assert defaults.settings["max_total_threads"] == 8
    assert defaults.settings["worker_max_tokens"] == 768
    assert defaults.settings["min_thread_tokens"] == 256
    # 512 + 8 x 768 + 2 x 1024 tokens at 1.1 GB read per token, 10 GB/s: 972 s, whole minutes
    assert defaults.settings["deadline_s"] == 1020.0
    bigger = local_defaults(real_model(tmp_path, file_bytes=4_400_000_000), parallel=True)
    assert bigger.settings["deadline_s"] > 3600  # a 7B on a CPU is given the time it needs


def test_a_tiny_model_gets_the_demo_limits(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", {"general.parameter_count": 360_000_000})
    defaults = local_defaults(LocalModel.open(path), parallel=True, slots=8)
    assert defaults.settings["max_depth"] == 1
    assert defaults.settings["max_threads"] == 4  # however many slots: it cannot plan wide
    assert defaults.settings["worker_max_tokens"] == 160
    assert defaults.settings["deadline_s"] == 300.0
    assert defaults.settings["direct_instructions"] == STEP_BY_STEP_SYSTEM
    assert defaults.ctx_per_slot == 4096


def test_the_slots_and_context_asked_for_are_used_and_shape_the_plan(tmp_path: Path) -> None:
    defaults = local_defaults(real_model(tmp_path), parallel=True, slots=2, ctx_per_slot=3000)
    assert (defaults.slots, defaults.ctx_per_slot) == (2, 3000)
    assert defaults.chosen_by == {"slots": "option", "ctx_per_slot": "option"}
    assert defaults.settings["max_threads"] == 2
    assert defaults.settings["max_total_threads"] == 4


def test_the_context_fits_the_training_and_the_cache_fits_memory(tmp_path: Path) -> None:
    short = write_gguf(tmp_path / "short.gguf", {**QWEN_15B, "qwen2.context_length": 2048})
    assert local_defaults(LocalModel.open(short), parallel=True).ctx_per_slot == 2048
    # No grouped-query attention (Llama-2-7B): 0.5 MB of cache per token.
    llama2 = {
        "general.architecture": "llama",
        "general.parameter_count": 6_738_000_000,
        "llama.context_length": 4096,
        "llama.block_count": 32,
        "llama.embedding_length": 4096,
        "llama.attention.head_count": 32,
    }
    model = LocalModel.open(write_gguf(tmp_path / "llama2.gguf", llama2))
    assert model.info.kv_bytes_per_token == 524288
    assert local_defaults(model, parallel=True).ctx_per_slot == 2048  # 4 x 4096 would be 8 GB
    assert local_defaults(model, parallel=False).ctx_per_slot == 4096  # one slot fits


def test_settings_the_user_gave_beat_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APR_WORKER_MAX_TOKENS", "2000")
    defaults = local_defaults(real_model(tmp_path), parallel=True)
    given = AprSettings(max_depth=1, max_concurrency=2)
    settings, sources = apply_local_defaults(
        given, defaults, base_url="http://127.0.0.1:9/v1", model="m", parallel_requests=4
    )
    assert (settings.max_depth, settings.max_concurrency, settings.worker_max_tokens) == (
        1,
        2,
        2000,
    )
    assert settings.planner_max_tokens == 512
    assert settings.max_threads == 4
    assert (settings.base_url, settings.model) == ("http://127.0.0.1:9/v1", "m")
    assert sources["yours"] == {"max_depth": 1, "max_concurrency": 2, "worker_max_tokens": 2000}
    assert "max_depth" not in sources["defaults"]
    assert sources["defaults"]["deadline_s"] == 1020.0


def test_a_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_gguf(tmp_path / "m.gguf", QWEN_15B)
    monkeypatch.chdir(tmp_path)
    model = LocalModel.open("m.gguf")
    assert model.path == tmp_path / "m.gguf"  # the server runs it, the trace records it
    assert model.alias == "m"
