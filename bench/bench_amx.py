"""AMX against the AVX-512 kernels on an AMX CPU (Intel Sapphire Rapids and later): pp512, pp2048, tg128.

    python bench/bench_amx.py [--rounds 6] [--threads N] [--model path/to/model.gguf]

Two native builds of the same patched source, through erllama's binding, each in a child process: the default one
(ggml's AMX tile kernels compiled in, made safe by native/patches/0001) and the same build with AMX compiled out
(``-mno-amx-*``: the AVX-512 / VNNI kernels take the quantised matmuls). Rounds alternate. If AMX does not win, the
default should turn it off (docs/native.md records the numbers and the decision). On a CPU without AMX this says so
and exits: there is nothing to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_llama  # noqa: E402
from bench.bench_build import WORKLOADS, binding  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not build_llama.cpu_has_amx():
        print("this CPU has no AMX (no amx_tile in /proc/cpuinfo): nothing to compare")
        return 0
    from erllama.testing import fetch

    model = args.model or fetch()
    amx = build_llama.ensure_built(build_llama.BuildOptions(make_current=False))
    avx512 = build_llama.ensure_built(
        build_llama.BuildOptions(extra_cmake_flags=build_llama.NO_AMX_FLAGS, make_current=False)
    )
    runs: dict[str, list[dict[str, float]]] = {"amx": [], "avx512": []}
    for r in range(args.rounds):
        for name, build in (("amx", amx), ("avx512", avx512))[:: 1 if r % 2 == 0 else -1]:
            runs[name].append(binding(build.lib_dir, model, args)[0])
        print(f"round {r + 1}: amx {runs['amx'][-1]}  avx512 {runs['avx512'][-1]}", file=sys.stderr)
    print(f"model {model.name}, threads {args.threads}, {args.rounds} rounds")
    for workload, _, _ in WORKLOADS:
        a = statistics.median(x[workload] for x in runs["amx"])
        b = statistics.median(x[workload] for x in runs["avx512"])
        pair = statistics.median(x[workload] / y[workload] for x, y in zip(runs["amx"], runs["avx512"], strict=True))
        print(f"{workload:8} AMX {a:9.1f} t/s   AVX-512 {b:9.1f} t/s   AMX/AVX-512 {pair:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
