"""What ``show`` prints about a GGUF file, read from its header.

The ``gguf`` package's reader builds a numpy view for every element of every array field: 12 s for Gemma 3's
262,144-token vocabulary on our VM. ``show`` needs a dozen scalars and the tensor shapes, so this walks the header
(the format of llama.cpp's ``gguf.cpp``) with ``struct`` over an mmap, skipping arrays by their lengths: ~0.1 s.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from erllama.errors import ChecksumError

__all__ = ["describe", "read_header", "summarize"]

# llama.cpp's LLAMA_FTYPE values (llama.h) -> the names its tools print
_FTYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}  # fmt: skip

# GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[item]) * count
            else:
                for _ in range(count):
                    self.value(item)
            return [count]  # arrays are skipped: only their length is kept
        raise ValueError(f"unknown GGUF value type {kind}")


def read_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...]]]]:
    """The key/value metadata (arrays reduced to ``[length]``) and the tensors' names and shapes.

    Raises:
        ChecksumError: not a GGUF file, or a header that runs past the end of the file.
    """
    if path.stat().st_size < 24:  # magic, version, tensor and key counts
        raise ChecksumError(f"{path} is not a GGUF file")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        try:
            if buf[:4] != b"GGUF":
                raise ChecksumError(f"{path} is not a GGUF file")
            cur.pos = 4
            version = cur.take("<I")
            if version < 2:
                raise ChecksumError(f"{path}: GGUF version {version} is not supported")
            n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                meta[key] = cur.value(cur.take("<I"))
            tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
                cur.pos += 4 + 8  # type, offset
                tensors.append((name, dims))
        except (struct.error, ValueError, IndexError, OverflowError) as exc:
            raise ChecksumError(f"{path}: corrupt GGUF header ({exc})") from exc
    return meta, tensors


def describe(path: Path) -> dict[str, Any]:
    """Architecture, parameters, quantisation, context length, chat template and license of a GGUF file."""
    return summarize(*read_header(path))


def summarize(meta: dict[str, Any], tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
    """:func:`describe` of a header :func:`read_header` has read."""
    arch = str(meta.get("general.architecture", ""))
    ftype = meta.get("general.file_type")
    params = 0
    for _, dims in tensors:
        n = 1
        for d in dims:
            n *= d
        params += n
    return {
        "name": str(meta.get("general.name", "")),
        "architecture": arch,
        "parameters": params,
        "size_label": str(meta.get("general.size_label", "")),
        "quantization": _FTYPES.get(int(ftype), str(ftype)) if ftype is not None else "",
        "context_length": int(meta.get(f"{arch}.context_length", 0)),
        "embedding_length": int(meta.get(f"{arch}.embedding_length", 0)),
        "layers": int(meta.get(f"{arch}.block_count", 0)),
        "vocab_size": int((meta.get("tokenizer.ggml.tokens") or [0])[0]),
        "license": str(meta.get("general.license", "")),
        "chat_template": str(meta.get("tokenizer.chat_template", "")),
    }
