"""The peers bench/ measures against: llama.cpp's tools from the stock build of the pinned source.

``build_llama.py --stock`` builds them with llama.cpp's default CMake options and none of erllama's patches (AMX
compiled out on AMX CPUs, where the unpatched path crashes): what a user who builds llama.cpp gets instead of
erllama, not a copy of erllama's own build.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import build_llama  # noqa: E402

__all__ = ["cpu_model", "stock_tool"]


def cpu_model() -> str:
    """The CPU's model name (what ``lscpu`` calls it), for a benchmark's report."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stock_tool(name: str) -> Path:
    """The path of ``llama-bench``, ``llama-batched-bench`` or ``llama-server`` from the stock build (built first if
    missing)."""
    return build_llama.ensure_built(build_llama.BuildOptions(stock=True)).tools[name]
