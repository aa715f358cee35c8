"""ggml's AMX path on an AMX CPU: unpatched it faults (ggml-org/llama.cpp#20824), patched it passes the self-check.

native/patches/0001 puts the tile configuration in constant storage and has every compute thread ask Linux for
XTILEDATA before its first tile instruction. Both tests need a CPU with AMX (Intel Sapphire Rapids or later) and are
skipped, saying so, everywhere else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import build_llama as bl
from erllama._native import library, selfcheck

pytestmark = [
    pytest.mark.native,
    pytest.mark.skipif(not bl.cpu_has_amx(), reason="this CPU has no AMX (no amx_tile in /proc/cpuinfo)"),
]


def _uses_amx(lib_dir: Path) -> bool:
    """Whether loading the smoke model on this build puts weights in ggml's AMX buffer (llama.cpp logs it)."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stdout);"
        "from erllama._native import Model; from erllama._native.selfcheck import smoke_model;"
        "Model(smoke_model()).close()"
    )
    env = selfcheck._child_env(lib_dir, library().cpu_variant)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return "AMX" in out.stdout + out.stderr


def test_the_patched_amx_path_passes(native: None) -> None:
    lib = library()
    if lib.batch_invariant or lib.cpu_variant not in ("native", "sapphirerapids"):
        pytest.skip(f"the build under test ({lib.cpu_variant}) has no AMX kernels")
    assert _uses_amx(lib.lib_dir), "the AMX buffer type is in use on this CPU"
    verdict = selfcheck.prove_variant(lib.lib_dir, lib.cpu_variant)
    assert verdict.ok, verdict.detail


@pytest.mark.slow
def test_the_unpatched_amx_path_faults(native: None) -> None:
    unpatched = bl.ensure_built(bl.BuildOptions(patches=False, prove=False))
    assert _uses_amx(unpatched.lib_dir)
    verdict = selfcheck.prove_variant(unpatched.lib_dir, "native")
    if verdict.ok:  # the fault needs XFD in the kernel and the compiler dropping the stores: not every AMX machine
        pytest.skip("the unpatched AMX path ran clean on this machine and kernel: nothing to show here")
    assert "died of" in verdict.detail, verdict.detail
