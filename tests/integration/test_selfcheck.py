"""A build proves itself before anyone uses it (erllama/_native/selfcheck.py).

The smoke decode runs in a child process per CPU kernel set and is compared with a float64 NumPy forward pass of the
same weights. These tests run it on the build under test, make it fail both ways a kernel can (a fault, wrong
logits) and check that the loader then refuses the build with an error, in a process that exits normally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from erllama._native import library, selfcheck, smoke

pytestmark = pytest.mark.native

ROOT = Path(__file__).resolve().parents[2]


def test_the_kernels_in_use_passed_their_self_check(native: None) -> None:
    lib = library()
    if lib.selfcheck == "skipped":
        pytest.skip("ERLLAMA_SKIP_SELFCHECK=1 or a GPU build: the gate is off")
    assert lib.selfcheck.startswith("passed"), lib.selfcheck
    verdict = selfcheck.prove_variant(lib.lib_dir, lib.cpu_variant)  # proved again, now
    assert verdict.ok, verdict.detail
    assert verdict.rel_error is not None
    assert verdict.rel_error <= selfcheck.TOLERANCE


def test_the_reference_is_independent_and_tight() -> None:
    ref = smoke.reference_logits()
    spec = smoke.SmokeSpec()
    assert ref.shape[0] == spec.n_prompt
    assert np.all(np.isfinite(ref))
    # another seed's weights are a different model: the comparison cannot pass by accident
    other = smoke.reference_logits(smoke.SmokeSpec(seed=spec.seed + 7))
    assert smoke.relative_error(other, ref) > 20 * selfcheck.TOLERANCE
    # what a kernel with half its blocks' scales lost would produce is far outside the tolerance
    damaged = ref.copy()
    damaged[:, ::2] *= 0.5
    assert smoke.relative_error(damaged, ref) > 4 * selfcheck.TOLERANCE


def _copy_build(tmp_path: Path) -> Path:
    """A copy of the build under test (libraries, abi.json and build.json), without its recorded verdicts."""
    src = library().lib_dir
    dest = tmp_path / "build-copy" / "build" / "bin"
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if (
            p.is_file()
            and p.name != selfcheck.RECORD_NAME
            and (p.suffix in (".so", ".dylib", ".json") or ".so." in p.name)
        ):
            shutil.copy2(p, dest / p.name)
    manifest = src.parent.parent / "build.json"
    if manifest.is_file():
        shutil.copy2(manifest, dest.parent.parent / "build.json")
    return dest


def _load_in_child(lib_dir: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    code = "import json; from erllama._native import library; b = library().build; print(json.dumps(b))"
    full = dict(os.environ, ERLLAMA_LIB_DIR=str(lib_dir), PYTHONPATH=str(ROOT), ERLLAMA_CACHE_DIR=str(tmp_path), **env)
    for key in (selfcheck.FAULT_ENV, selfcheck.SKIP_ENV, "ERLLAMA_CPU_VARIANT"):
        if key not in env:
            full.pop(key, None)
    shutil.copytree(smoke.smoke_model().parent, tmp_path / "selfcheck", dirs_exist_ok=True)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_a_crashing_build_is_caught_and_the_loader_refuses_it(native: None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    lib_dir = _copy_build(tmp_path)
    name = library().cpu_variant
    monkeypatch.setenv(selfcheck.FAULT_ENV, f"crash:{name}")
    report = selfcheck.prove_build(lib_dir)
    assert not report["variants"][name]["ok"]
    assert "died of SIGSEGV" in report["variants"][name]["detail"], report
    monkeypatch.delenv(selfcheck.FAULT_ENV)
    proc = _load_in_child(lib_dir, tmp_path, **({"ERLLAMA_CPU_VARIANT": name} if name != "native" else {}))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # an exception, not a signal
    assert "LibraryError" in proc.stderr
    assert "self-check" in proc.stderr
    assert "build_llama.py" in proc.stderr, "the error names the fix"


@pytest.mark.slow
def test_wrong_logits_fail_the_self_check(native: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(selfcheck.FAULT_ENV, "logits")
    verdict = selfcheck.prove_variant(library().lib_dir, library().cpu_variant)
    assert not verdict.ok
    assert verdict.detail.startswith("wrong logits: relative error")
    assert verdict.rel_error is not None
    assert verdict.rel_error > selfcheck.TOLERANCE


@pytest.mark.slow
def test_a_copied_build_is_proven_on_its_first_load(native: None, tmp_path: Path) -> None:
    lib_dir = _copy_build(tmp_path)
    assert not (lib_dir / selfcheck.RECORD_NAME).exists()
    proc = _load_in_child(lib_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    build = json.loads(proc.stdout.strip().splitlines()[-1])
    assert build["selfcheck"].startswith("passed")
    record = json.loads((lib_dir / selfcheck.RECORD_NAME).read_text())
    assert record["cpus"][selfcheck.cpu_fingerprint()][build["cpu_variant"]]["ok"] is True
    again = _load_in_child(lib_dir, tmp_path, **{selfcheck.FAULT_ENV: "crash"})
    assert again.returncode == 0, "a recorded verdict is not proved again"


def _portable_lib_dir() -> Path | None:
    current = Path(os.environ.get("ERLLAMA_CACHE_DIR", Path.home() / ".cache" / "erllama")) / "llama"
    pointer = current / "current-cpu-portable.json"
    if not pointer.is_file():
        return None
    lib_dir = Path(json.loads(pointer.read_text())["lib_dir"])
    return lib_dir if lib_dir.is_dir() else None


@pytest.mark.slow
def test_a_portable_build_falls_back_to_the_next_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    portable = _portable_lib_dir()
    if portable is None:
        pytest.skip("no portable build here (python build_llama.py --portable; ~40 min on 2 cores)")
    variants = selfcheck.list_variants(portable)
    runnable = [name for name, score in variants if score > 0]
    assert len(runnable) >= 2, variants
    best, second = runnable[0], runnable[1]
    lib_dir = tmp_path / "portable" / "build" / "bin"
    shutil.copytree(portable, lib_dir, ignore=shutil.ignore_patterns(selfcheck.RECORD_NAME, "llama-*"))
    shutil.copy2(portable.parent.parent / "build.json", lib_dir.parent.parent / "build.json")
    monkeypatch.setenv(selfcheck.FAULT_ENV, f"crash:{best}")
    report = selfcheck.prove_build(lib_dir)
    assert not report["variants"][best]["ok"]
    assert report["best"] == second
    monkeypatch.delenv(selfcheck.FAULT_ENV)
    proc = _load_in_child(lib_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["cpu_variant"] == second
    assert best in proc.stderr or proc.stderr == "" or "failed its self-check" in proc.stderr
