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
from erllama._native.smoke import SmokeSpec, reference_logits, relative_error, smoke_model, smoke_tokens

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
# The child: one smoke decode with one kernel set


def _fault(kind: str, variant: str) -> bool:
    want = os.environ.get(FAULT_ENV, "")
    name, _, only = want.partition(":")
    return name == kind and only in ("", variant)


def _child_decode(out: Path) -> int:
    from erllama._native.batch import Batch
    from erllama._native.context import Context
    from erllama._native.loader import library
    from erllama._native.model import Model
    from erllama._native.params import ContextConfig

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
