"""The self-check's smoke model and its reference.

A small generated llama (Q8_0, Q4_0, F16 and F32 tensors, dimensions that engage ggml's quantised matmul, repack,
llamafile and AMX paths), its prompt, and its logits computed another way: a float64 NumPy forward pass that mirrors
the roundings ggml makes on purpose (activations quantised to Q8_0 before a Q8_0 / Q4_0 product, rounded to F16
before an F16 one, K and V stored as F16). :mod:`erllama._native.selfcheck` runs it on every kernel set of a build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from erllama._native.loader import _cache_root as loader_cache_root

__all__ = [
    "SmokeSpec",
    "reference_logits",
    "relative_error",
    "smoke_model",
    "smoke_tokens",
    "spec_digest",
    "write_smoke_model",
]


@dataclasses.dataclass(frozen=True, slots=True)
class SmokeSpec:
    """Shape of the smoke model: every matrix dimension a multiple of 32 (ggml's AMX and repack kernels need it)."""

    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 512
    n_prompt: int = 40
    rope_base: float = 10000.0
    eps: float = 1e-5
    seed: int = 20260


def _qtypes(spec: SmokeSpec) -> dict[str, str]:
    """Each tensor's storage type: layer 0 attention in Q8_0 and its FFN in Q4_0, layer 1 the other way round."""
    out = {"token_embd.weight": "Q8_0", "output.weight": "F16", "output_norm.weight": "F32"}
    for i in range(spec.n_layer):
        attn, ffn = ("Q8_0", "Q4_0") if i % 2 == 0 else ("Q4_0", "Q8_0")
        out |= {f"blk.{i}.attn_norm.weight": "F32", f"blk.{i}.ffn_norm.weight": "F32"}
        out |= {f"blk.{i}.attn_{n}.weight": attn for n in ("q", "k", "v", "output")}
        out |= {f"blk.{i}.ffn_{n}.weight": ffn for n in ("gate", "up", "down")}
    return out


def _raw_weights(spec: SmokeSpec, n_vocab: int) -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(spec.seed)
    head_dim = spec.n_embd // spec.n_head
    kv = head_dim * spec.n_head_kv

    def mat(rows: int, cols: int, scale: float) -> npt.NDArray[np.float32]:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    s = 1.0 / np.sqrt(spec.n_embd)
    w = {"token_embd.weight": mat(n_vocab, spec.n_embd, 1.0)}
    for i in range(spec.n_layer):
        w[f"blk.{i}.attn_norm.weight"] = (1.0 + 0.1 * rng.standard_normal(spec.n_embd)).astype(np.float32)
        w[f"blk.{i}.attn_q.weight"] = mat(spec.n_embd, spec.n_embd, s)
        w[f"blk.{i}.attn_k.weight"] = mat(kv, spec.n_embd, s)
        w[f"blk.{i}.attn_v.weight"] = mat(kv, spec.n_embd, s)
        w[f"blk.{i}.attn_output.weight"] = mat(spec.n_embd, spec.n_embd, s)
        w[f"blk.{i}.ffn_norm.weight"] = (1.0 + 0.1 * rng.standard_normal(spec.n_embd)).astype(np.float32)
        w[f"blk.{i}.ffn_gate.weight"] = mat(spec.n_ff, spec.n_embd, s)
        w[f"blk.{i}.ffn_up.weight"] = mat(spec.n_ff, spec.n_embd, s)
        w[f"blk.{i}.ffn_down.weight"] = mat(spec.n_embd, spec.n_ff, 1.0 / np.sqrt(spec.n_ff))
    w["output_norm.weight"] = (1.0 + 0.1 * rng.standard_normal(spec.n_embd)).astype(np.float32)
    w["output.weight"] = mat(n_vocab, spec.n_embd, 3.0 * s)
    return w


def _stored(spec: SmokeSpec) -> dict[str, tuple[npt.NDArray[Any], str]]:
    """Each tensor as written to the file (quantised bytes, F16 or F32) with its type name."""
    import gguf

    from erllama.testing.tiny import spm_vocab

    n_vocab = len(spm_vocab()[0])
    out: dict[str, tuple[npt.NDArray[Any], str]] = {}
    types = _qtypes(spec)
    for name, arr in _raw_weights(spec, n_vocab).items():
        kind = types[name]
        if kind == "F32":
            out[name] = (arr, kind)
        elif kind == "F16":
            out[name] = (arr.astype(np.float16), kind)
        else:
            out[name] = (gguf.quants.quantize(arr, gguf.GGMLQuantizationType[kind]), kind)
    return out


def _dequantized(spec: SmokeSpec) -> dict[str, npt.NDArray[np.float64]]:
    """The exact values ggml computes with: the stored bytes decoded, in float64."""
    import gguf

    out = {}
    for name, (data, kind) in _stored(spec).items():
        if kind in ("F32", "F16"):
            out[name] = data.astype(np.float64)
        else:
            out[name] = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).astype(np.float64)
    return out


def spec_digest(spec: SmokeSpec) -> str:
    from erllama.testing.tiny import spm_vocab

    return hashlib.sha256(repr((1, spec, spm_vocab())).encode()).hexdigest()[:12]


def write_smoke_model(path: Path, spec: SmokeSpec) -> Path:
    """Write the smoke model (vocabulary and template of the tiny test model, weights of its own) atomically."""
    import gguf

    from erllama.testing.tiny import finish_gguf, llama_writer

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    writer = llama_writer(tmp, "erllama-smoke", n_embd=spec.n_embd, n_layer=spec.n_layer, n_head=spec.n_head,
                          n_head_kv=spec.n_head_kv, n_ff=spec.n_ff, rope_base=spec.rope_base, eps=spec.eps,
                          file_type=gguf.LlamaFileType.MOSTLY_Q8_0)  # fmt: skip
    for name, (data, kind) in _stored(spec).items():
        if kind in ("F32", "F16"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    return finish_gguf(writer, tmp, path)


def smoke_model(spec: SmokeSpec | None = None) -> Path:
    """The smoke model's path under ``$ERLLAMA_CACHE_DIR/selfcheck/``, written once."""
    spec = spec or SmokeSpec()
    base = loader_cache_root() / "selfcheck"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"erllama-smoke-{spec_digest(spec)}.gguf"
    if not path.is_file():
        write_smoke_model(path, spec)
    return path


def smoke_tokens(spec: SmokeSpec, n_vocab: int) -> list[int]:
    """BOS, then a fixed pseudo-random prompt (any id decodes; no tokenizer is involved)."""
    rng = np.random.default_rng(spec.seed + 1)
    return [1, *(int(t) for t in rng.integers(3, n_vocab, spec.n_prompt - 1))]


def _q8_0(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Rows rounded through Q8_0, as ggml quantises activations before a Q8_0 or Q4_0 product."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(x.astype(np.float32), q8), q8).astype(np.float64)


def _f16(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return x.astype(np.float16).astype(np.float64)


def reference_logits(spec: SmokeSpec | None = None) -> npt.NDArray[np.float64]:
    """Logits of every prompt position, from a float64 NumPy forward pass of the smoke model's stored weights."""
    spec = spec or SmokeSpec()
    w = _dequantized(spec)
    types = _qtypes(spec)
    n_vocab = w["token_embd.weight"].shape[0]
    tokens = smoke_tokens(spec, n_vocab)
    n = len(tokens)
    hd = spec.n_embd // spec.n_head
    group = spec.n_head // spec.n_head_kv

    def mm(x: npt.NDArray[np.float64], name: str) -> npt.NDArray[np.float64]:
        kind = types[name]
        x = _q8_0(x) if kind in ("Q8_0", "Q4_0") else _f16(x) if kind == "F16" else x
        out: npt.NDArray[np.float64] = x @ w[name].T
        return out

    def rms(x: npt.NDArray[np.float64], name: str) -> npt.NDArray[np.float64]:
        normed: npt.NDArray[np.float64] = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + spec.eps)
        return normed * w[name]

    # RoPE as llama.cpp's LLAMA_ROPE_TYPE_NORM: adjacent pairs (2i, 2i+1) rotated by pos * base^(-2i/hd)
    pos = np.arange(n, dtype=np.float64)[:, None]
    theta = pos * spec.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    mask = np.triu(np.full((n, n), -np.inf), 1)
    x = w["token_embd.weight"][tokens]
    for i in range(spec.n_layer):
        h = rms(x, f"blk.{i}.attn_norm.weight")
        q = rope(mm(h, f"blk.{i}.attn_q.weight").reshape(n, spec.n_head, hd))
        k = _f16(rope(mm(h, f"blk.{i}.attn_k.weight").reshape(n, spec.n_head_kv, hd)))  # the F16 KV cache
        v = _f16(mm(h, f"blk.{i}.attn_v.weight").reshape(n, spec.n_head_kv, hd))
        heads = []
        for head in range(spec.n_head):
            kh, vh = k[:, head // group], v[:, head // group]
            scores = _f16(q[:, head]) @ kh.T / np.sqrt(hd) + mask
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            heads.append(_f16(p) @ vh)
        x = x + mm(np.concatenate(heads, axis=-1), f"blk.{i}.attn_output.weight")
        h = rms(x, f"blk.{i}.ffn_norm.weight")
        gate, up = mm(h, f"blk.{i}.ffn_gate.weight"), mm(h, f"blk.{i}.ffn_up.weight")
        x = x + mm(gate / (1.0 + np.exp(-gate)) * up, f"blk.{i}.ffn_down.weight")
    return mm(rms(x, "output_norm.weight"), "output.weight")


def relative_error(got: npt.NDArray[Any], ref: npt.NDArray[np.float64]) -> float:
    """The largest per-row relative L2 error."""
    if got.shape != ref.shape:
        return float("inf")
    diff = np.linalg.norm(got.astype(np.float64) - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    return float(np.max(diff)) if np.all(np.isfinite(diff)) else float("inf")
