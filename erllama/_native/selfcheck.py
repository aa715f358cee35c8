"""A build proves itself before anyone uses it.

Every CPU kernel set of a build (each variant of a portable build, or the one kernel set of a native build) runs a
smoke decode of a small generated model **in a child process of its own**, so a kernel that faults (an illegal
instruction, ggml's AMX tile path on some CPUs, ggml-org/llama.cpp#20824) kills the child, not the caller. The
logits are compared with a reference computed another way: a float64 NumPy forward pass of the same weights. The
model is a llama with Q8_0, Q4_0, F16 and F32 tensors and dimensions that engage ggml's quantised matmul, repack,
llamafile and AMX paths; the prompt runs as one 39-token batch (the multi-row kernels, on several threads) and then
one token alone (the one-row kernels).

The reference mirrors the roundings ggml makes on purpose (activations quantised to Q8_0 before a Q8_0 / Q4_0
product, rounded to F16 before an F16 one, K and V stored as F16), so what is left is summation order and float32
accumulation: a sound kernel set lands below 1e-2 relative error per row (rounding flips at quantisation
boundaries, amplified by the random weights), a wrong one near 1. ``TOLERANCE`` sits
between, with a wide margin both ways.

Verdicts are recorded per CPU (a fingerprint of its model name and feature flags) and per library set, in
``selfcheck.json`` beside the libraries, or under ``$ERLLAMA_CACHE_DIR/selfcheck/`` where that is read-only. The
loader reads them (``loader._choose_cpu_variant``) and proves a kernel set it finds no verdict for, so a build
copied to another machine is checked there before its first use.

Command line, ``main()``: ``prove --lib-dir DIR [--json]`` (what build_llama.py runs), and its children
``variants --lib-dir DIR`` and ``decode --out FILE``; e.g.
``python -c 'import sys; from erllama._native.selfcheck import main; sys.exit(main())' prove --lib-dir DIR``.

``ERLLAMA_SELFCHECK_FAULT`` exists for the tests: ``crash`` (or ``crash:VARIANT``) makes the smoke decode fault
inside C before its first decode; ``logits`` (or ``logits:VARIANT``) perturbs its logits as a wrong kernel would.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from erllama._native.loader import _cache_root as loader_cache_root

__all__ = ["TOLERANCE", "SmokeSpec", "Verdict", "prove_build", "prove_variant"]

CHILD_ENV = "ERLLAMA_SELFCHECK_CHILD"
# how a child runs this module's main() (``-m`` would import the module twice: erllama._native imports it)
_SELF = (sys.executable, "-c", "import sys; from erllama._native.selfcheck import main; sys.exit(main())")
FAULT_ENV = "ERLLAMA_SELFCHECK_FAULT"
SKIP_ENV = "ERLLAMA_SKIP_SELFCHECK"
RECORD_NAME = "selfcheck.json"
_RECORD_VERSION = 1
# Largest relative L2 error of any logits row (||got - ref|| / ||ref||). Measured on sound kernel sets: <= 1e-2 (see
# docs/native.md, "Self-check"); a wrong kernel is off by O(1).
TOLERANCE = 0.05
TIMEOUT_S = 300.0


# --------------------------------------------------------------------------------------------------------------
# The smoke model and its reference


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


# --------------------------------------------------------------------------------------------------------------
# The child: one smoke decode with one kernel set


def _fault(kind: str, variant: str) -> bool:
    want = os.environ.get(FAULT_ENV, "")
    name, _, only = want.partition(":")
    return name == kind and only in ("", variant)


def _child_decode(out: Path) -> int:
    from erllama._native.batch import Batch
    from erllama._native.context import Context, ContextConfig
    from erllama._native.loader import library
    from erllama._native.model import Model

    spec = SmokeSpec()
    variant = library().cpu_variant
    with (
        Model(smoke_model(spec)) as model,
        # several threads: the AMX fault was on ggml's worker threads, not the caller's
        Context(model, ContextConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=4)) as ctx,
    ):
        tokens = smoke_tokens(spec, model.n_vocab)
        batch = Batch(len(tokens))
        for i, tok in enumerate(tokens[:-1]):
            batch.add(tok, i, 0, logits=True)
        if _fault("crash", variant):
            import ctypes

            ctypes.string_at(0)  # a real SIGSEGV in C, as a faulting kernel would raise
        ctx.decode(batch)
        rows = [ctx.logits(i) for i in range(len(tokens) - 1)]
        batch.clear()
        batch.add(tokens[-1], len(tokens) - 1, 0, logits=True)
        ctx.decode(batch)
        rows.append(ctx.logits(0))
    logits = np.stack(rows)
    if _fault("logits", variant):
        logits = logits + np.random.default_rng(0).standard_normal(logits.shape).astype(np.float32) * logits.std()
    np.save(out, logits)
    print(json.dumps({"variant": variant}))
    return 0


def _child_variants(lib_dir: Path) -> int:
    from erllama._native.loader import _dlopen_all, cpu_variants

    _dlopen_all(lib_dir)
    print(json.dumps([{"name": v.name, "score": v.score} for v in cpu_variants(lib_dir)]))
    return 0


# --------------------------------------------------------------------------------------------------------------
# The parent: verdicts, records, the gate


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one kernel set's smoke decode on this CPU."""

    variant: str
    ok: bool
    detail: str
    rel_error: float | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        return f"passed, rel. error {self.rel_error:.1e}" if self.ok and self.rel_error is not None else self.detail

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def in_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def gate_enabled(manifest: dict[str, Any]) -> bool:
    """Whether the loader must see a passed verdict first: CPU builds, outside the self-check's own children, unless
    ``ERLLAMA_SKIP_SELFCHECK=1``. GPU builds are not smoke-checked (their CPU side is llama.cpp's default)."""
    if in_child() or os.environ.get(SKIP_ENV) == "1":
        return False
    return manifest.get("backend") not in ("cuda", "metal")


@functools.cache
def cpu_fingerprint() -> str:
    """Names the CPU a verdict holds for: its model name and feature flags (and the architecture)."""
    fields: dict[str, str] = {"machine": platform.machine(), "system": platform.system()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
                fields.setdefault(key, value.strip())  # the first CPU's (the flags the kernel reports are common)
    except OSError:
        fields["processor"] = platform.processor()
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _libs_signature(lib_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(lib_dir.glob("lib*")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _record_paths(lib_dir: Path) -> list[Path]:
    alt = loader_cache_root() / "selfcheck" / f"{hashlib.sha256(str(lib_dir.resolve()).encode()).hexdigest()[:16]}.json"
    return [lib_dir / RECORD_NAME, alt]


def _read_record(lib_dir: Path) -> dict[str, Any]:
    for path in _record_paths(lib_dir):
        with contextlib.suppress(OSError, ValueError):
            record: dict[str, Any] = json.loads(path.read_text())
            if record.get("version") == _RECORD_VERSION and record.get("libs") == _libs_signature(lib_dir):
                return record
    return {}


def _write_record(lib_dir: Path, verdicts: Sequence[Verdict]) -> None:
    record = _read_record(lib_dir) or {"version": _RECORD_VERSION, "libs": _libs_signature(lib_dir), "cpus": {}}
    cpu = record["cpus"].setdefault(cpu_fingerprint(), {})
    for v in verdicts:
        cpu[v.variant] = v.to_json()
    text = json.dumps(record, indent=2, sort_keys=True)
    for path in _record_paths(lib_dir):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(path)
            return
        except OSError:
            continue


def recorded(lib_dir: Path, variant: str) -> Verdict | None:
    entry = _read_record(lib_dir).get("cpus", {}).get(cpu_fingerprint(), {}).get(variant)
    try:
        return Verdict(**entry) if entry else None
    except TypeError:  # a record this version cannot read: proved again
        return None


def _child_env(lib_dir: Path, variant: str) -> dict[str, str]:
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    env["ERLLAMA_LIB_DIR"] = str(lib_dir)
    env.pop("ERLLAMA_CPU_VARIANT", None)
    from erllama._native.loader import variant_files

    if variant in variant_files(lib_dir):
        env["ERLLAMA_CPU_VARIANT"] = variant
    root = str(Path(__file__).resolve().parents[2])  # so a source checkout's children import this erllama
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


_reference: npt.NDArray[np.float64] | None = None


def prove_variant(lib_dir: Path, variant: str) -> Verdict:
    """Run the smoke decode with one kernel set in a child process and judge it against the NumPy reference."""
    global _reference  # noqa: PLW0603 - computed once per process
    if _reference is None:
        _reference = reference_logits()
    smoke_model()  # written here, not raced by children
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="erllama-selfcheck-") as tmp:
        out = Path(tmp) / "logits.npy"
        cmd = [*_SELF, "decode", "--out", str(out)]
        try:
            proc = subprocess.run(cmd, env=_child_env(lib_dir, variant), capture_output=True, text=True,
                                  timeout=TIMEOUT_S, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return Verdict(variant, False, f"the smoke decode did not finish in {TIMEOUT_S:.0f} s")
        took = time.monotonic() - t0
        if proc.returncode < 0:
            why = f"the smoke decode died of {_signal_name(proc.returncode)}"
            return Verdict(variant, False, why + _last_lines(proc.stderr), seconds=took)
        if proc.returncode != 0 or not out.is_file():
            why = f"the smoke decode failed (exit {proc.returncode})"
            return Verdict(variant, False, why + _last_lines(proc.stderr), seconds=took)
        err = relative_error(np.load(out), _reference)
    if err <= TOLERANCE:
        return Verdict(variant, True, "passed", err, took)
    return Verdict(variant, False, f"wrong logits: relative error {err:.3g} > {TOLERANCE}", err, took)


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()][-n:]
    return (": " + " | ".join(lines))[:600] if lines else ""


def verdict(lib_dir: Path, variant: str) -> Verdict:
    """The recorded verdict for this CPU, or a fresh one (proved now and recorded)."""
    found = recorded(lib_dir, variant)
    if found is not None:
        return found
    import logging

    logging.getLogger("erllama.llama").info("self-checking CPU kernels %s of %s on this CPU", variant, lib_dir)
    result = prove_variant(lib_dir, variant)
    _write_record(lib_dir, [result])
    return result


def list_variants(lib_dir: Path) -> list[tuple[str, int]]:
    """The build's CPU variants and their scores for this CPU (in a child: dlopen-ing them is its business)."""
    cmd = [*_SELF, "variants", "--lib-dir", str(lib_dir)]
    proc = subprocess.run(cmd, env=_child_env(lib_dir, ""), capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"could not list the CPU variants of {lib_dir}: {proc.stderr.strip()[-2000:]}")
    return [(v["name"], int(v["score"])) for v in json.loads(proc.stdout.strip().splitlines()[-1])]


def prove_build(lib_dir: Path, *, say: Any = None, reuse: bool = False) -> dict[str, Any]:
    """Prove every kernel set of a build that can run on this CPU; record and return the verdicts. With ``reuse``,
    a verdict already recorded for this CPU and these libraries stands."""
    manifest_file = lib_dir.parent.parent / "build.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    variants = list_variants(lib_dir)
    names = [n for n, score in variants if score > 0] if variants else [str(manifest.get("cpu_kind") or "native")]
    skipped = [n for n, score in variants if score <= 0]
    verdicts = []
    for name in names:
        v = (recorded(lib_dir, name) if reuse else None) or prove_variant(lib_dir, name)
        verdicts.append(v)
        if say is not None:
            state = f"ok, rel. error {v.rel_error:.1e}" if v.ok else f"BAD: {v.detail}"
            say(f"{name}: {state} ({v.seconds:.1f} s)")
    _write_record(lib_dir, verdicts)
    good = [v.variant for v in verdicts if v.ok]
    bad = [f"{v.variant} ({v.detail})" for v in verdicts if not v.ok]
    summary = f"{len(good)} of {len(verdicts)} CPU kernel set(s) passed" + (
        f"; failed: {'; '.join(bad)}" if bad else ""
    )
    return {
        "usable": bool(good),
        "best": good[0] if good else None,
        "summary": summary,
        "cpu": cpu_fingerprint(),
        "tolerance": TOLERANCE,
        "variants": {v.variant: v.to_json() for v in verdicts},
        "cannot_run_here": skipped,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erllama selfcheck", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_prove = sub.add_parser("prove", help="prove every CPU kernel set of a build on this CPU")
    p_prove.add_argument("--lib-dir", type=Path, required=True)
    p_prove.add_argument("--json", action="store_true", help="print the report as one JSON line on stdout")
    p_prove.add_argument("--reuse", action="store_true", help="keep verdicts already recorded for this CPU")
    p_var = sub.add_parser("variants", help="(child) list the CPU variants and their scores")
    p_var.add_argument("--lib-dir", type=Path, required=True)
    p_dec = sub.add_parser("decode", help="(child) run the smoke decode, save its logits")
    p_dec.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "decode":
        return _child_decode(args.out)
    if args.cmd == "variants":
        return _child_variants(args.lib_dir)
    report = prove_build(args.lib_dir, say=lambda msg: print(msg, file=sys.stderr, flush=True), reuse=args.reuse)
    if args.json:
        print(json.dumps(report))
    else:
        print(report["summary"])
    return 0 if report["usable"] else 1


if __name__ == "__main__":
    sys.exit(main())
