"""What a GGUF model file says about itself: name, size, context and chat template.

Only the header is read (metadata and tensor shapes, never the weights), through a memory map.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GgufError", "GgufInfo", "read_gguf"]

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# The fixed-size value types: uint8 int8 uint16 int16 uint32 int32 float32 bool (0-7), then
# uint64 int64 float64 (10-12).
_CODES = dict(zip((*range(8), 10, 11, 12), "BbHhIif?Qqd", strict=True))
_SCALARS = {kind: struct.Struct(f"<{code}") for kind, code in _CODES.items()}
_U32, _U64 = _SCALARS[4], _SCALARS[10]
_KV_BYTES = 2  # llama.cpp's default KV cache type is f16


class GgufError(ValueError):
    """The file is not a GGUF model this reader understands; the message says why."""


@dataclass(frozen=True)
class GgufInfo:
    """The facts about a model that choosing its defaults needs."""

    path: Path
    file_bytes: int
    """Size of the file: what one generated token reads from memory, roughly."""

    parameters: int
    """``general.parameter_count``, else the sum of the tensors' element counts."""

    name: str | None
    """``general.name``, e.g. ``Qwen2.5 Coder 1.5B Instruct``."""

    architecture: str | None
    """``general.architecture``, e.g. ``qwen2`` or ``llama``."""

    context_length: int | None
    """The context the model was trained for (``<arch>.context_length``)."""

    kv_bytes_per_token: int | None
    """Bytes of f16 KV cache one token of context takes, over all layers (None if unknown)."""

    has_chat_template: bool
    """Whether the file carries its chat template (``tokenizer.chat_template``)."""


class _Reader:
    """Bounds-checked little-endian reads from the header; truncation is a ``GgufError``."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> int:
        start, self.pos = self.pos, self.pos + size
        if size < 0 or self.pos > len(self.data):
            raise GgufError("the file is truncated or corrupt (its header runs past its end)")
        return start

    def scalar(self, kind: int) -> Any:
        layout = _SCALARS.get(kind)
        if layout is None:
            raise GgufError(f"unknown metadata value type {kind} (corrupt, or a newer GGUF)")
        return layout.unpack_from(self.data, self.take(layout.size))[0]

    def string(self) -> str:
        size = self.scalar(10)
        start = self.take(size)
        return bytes(self.data[start : start + size]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        """A metadata value; arrays (the vocabulary, merges) are skipped and read as None."""
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(kind)
        item, count = self.scalar(4), self.scalar(10)
        layout = _SCALARS.get(item)
        if layout is not None:
            self.take(layout.size * count)
        elif item == _STRING:
            self.skip_strings(count)
        else:
            for _ in range(count):
                self.value(item)
        return None

    def skip_strings(self, count: int) -> None:
        # A tight loop: a vocabulary holds 150,000 strings, and this is most of the header.
        data, pos, unpack = self.data, self.pos, _U64.unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(data, pos)[0]
        except struct.error:
            pos = len(data) + 1
        self.take(pos - self.pos)


def read_gguf(path: Path) -> GgufInfo:
    """Read the header of the GGUF model at ``path``.

    Raises:
        GgufError: the file is not GGUF, is of an unsupported version, or is truncated.
        OSError: the file cannot be opened.
    """
    with path.open("rb") as file:
        if file.read(4) != _MAGIC:
            raise GgufError("not a GGUF model file (llama.cpp's format; its first bytes differ)")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            reader, size = _Reader(data), len(data)
            reader.take(4)
            version = reader.scalar(4)
            if version not in (2, 3):
                # Version 1 (August 2023) used 32-bit counts; a huge number is a big-endian file.
                raise GgufError(f"GGUF version {version} is not supported (2 and 3 are)")
            tensors, entries = reader.scalar(10), reader.scalar(10)
            meta: dict[str, Any] = {}
            for _ in range(entries):
                key = reader.string()
                meta[key] = reader.value(reader.scalar(4))
            counted = 0
            for _ in range(tensors):
                reader.string()
                counted += math.prod(reader.scalar(10) for _ in range(reader.scalar(4)))  # shape
                reader.take(_U32.size + _U64.size)  # type, offset
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    return GgufInfo(
        path=path,
        file_bytes=size,
        parameters=_int(meta.get("general.parameter_count")) or counted,
        name=name if isinstance(name := meta.get("general.name"), str) else None,
        architecture=arch,
        context_length=_int(meta.get(f"{arch}.context_length")),
        kv_bytes_per_token=_kv_bytes_per_token(meta, arch),
        has_chat_template=bool(meta.get("tokenizer.chat_template")),
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _kv_bytes_per_token(meta: dict[str, Any], arch: str | None) -> int | None:
    layers = _int(meta.get(f"{arch}.block_count"))
    heads = _int(meta.get(f"{arch}.attention.head_count"))
    kv_heads = _int(meta.get(f"{arch}.attention.head_count_kv")) or heads
    width = _int(meta.get(f"{arch}.embedding_length"))
    head_dim = _int(meta.get(f"{arch}.attention.key_length")) or (
        width // heads if width and heads else None
    )
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * _KV_BYTES  # keys and values
