"""erllama's builds against the stock llama.cpp a user would build instead, in one run: pp512, pp2048, tg128.

    python bench/bench_build.py                       # native (the default build) vs stock llama-bench
    python bench/bench_build.py --portable            # also the portable build (built first if missing: ~40 min
                                                      # on 2 cores), and native vs portable
    python bench/bench_build.py --rounds 6 --threads 2 --model path/to/model.gguf

The peer is ``llama-bench`` from ``build_llama.py --stock``: the pinned source with llama.cpp's default CMake options
and none of erllama's patches (AMX compiled out on AMX CPUs, where the unpatched path crashes). erllama's side is
its binding over each of its own builds, each in a child process of its own (a process loads one libllama), running
llama-bench's workloads: ``pp``: clear the KV cache, decode N random tokens (BOS first) in n_batch chunks; ``tg``:
decode 128 random tokens one at a time, logits of each. Same model, threads, n_batch (2048) / n_ubatch (512), flash
attention off, F16 KV, n_ctx sized per test as llama-bench does. Peers alternate round by round (rotated order);
the table shows medians and the median of the per-round paired ratios with its interquartile range.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_llama  # noqa: E402
from bench.peers import cpu_model  # noqa: E402

WORKLOADS = (("pp512", 512, 0), ("pp2048", 2048, 0), ("tg128", 0, 128))


def llama_bench(tool: Path, model: Path, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, n_prompt, n_gen in WORKLOADS:
        cmd = [str(tool), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(args.threads),
               "-b", "2048", "-ub", "512", "-fa", "0", "-r", str(args.reps), "-o", "json"]  # fmt: skip
        rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        out[name] = float(rows[0]["avg_ts"])
    return out


def binding(lib_dir: Path, model: Path, args: argparse.Namespace) -> tuple[dict[str, float], str]:
    env = dict(os.environ, ERLLAMA_LIB_DIR=str(lib_dir), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(model),
           "--threads", str(args.threads), "--reps", str(args.reps)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the binding child failed on {lib_dir}:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return data["tps"], data["variant"]


def child(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    import numpy as np

    from erllama._native import Batch, Context, ContextConfig, FlashAttention, Model, library

    rng = np.random.default_rng(0)
    tps: dict[str, float] = {}
    with Model(args.model) as model:
        cfg = ContextConfig(n_batch=2048, n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads,
                            flash_attn=FlashAttention.OFF)  # fmt: skip

        def tokens(n: int) -> Any:
            t = rng.integers(0, model.n_vocab, size=n, dtype=np.int32)
            if model.info.add_bos:
                t[0] = model.info.bos
            return t

        for name, n_prompt, n_gen in WORKLOADS:
            with Context(model, dataclasses.replace(cfg, n_ctx=max(n_prompt, n_gen))) as ctx:
                batch = Batch(2048)
                runs = []
                for rep in range(args.reps + 1):  # the first is a warm-up, as llama-bench's
                    ctx.clear(data=False)
                    toks = tokens(n_prompt or n_gen)
                    t0 = time.perf_counter()
                    if n_prompt:
                        for off in range(0, n_prompt, 2048):
                            batch.clear()
                            batch.add_sequence(toks[off : off + 2048], off, 0)
                            ctx.decode(batch)
                    else:
                        for i in range(n_gen):
                            batch.clear()
                            batch.add(int(toks[i]), i, 0, True)
                            ctx.decode(batch)
                    if rep:
                        runs.append(len(toks) / (time.perf_counter() - t0))
                tps[name] = statistics.mean(runs)
    print(json.dumps({"tps": tps, "variant": library().cpu_variant}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF to measure (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=2, help="repetitions per round (llama-bench -r)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--portable", action="store_true", help="also measure the portable build")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from erllama.testing import fetch

    model = args.model or fetch()
    stock = build_llama.ensure_built(build_llama.BuildOptions(stock=True))
    peers: dict[str, Any] = {"stock": lambda: llama_bench(stock.tools["llama-bench"], model, args)}
    kinds = ["native", *(["portable"] if args.portable else [])]
    variants: dict[str, str] = {}
    for kind in kinds:
        build = build_llama.ensure_built(build_llama.BuildOptions(cpu_kind=kind, make_current=False))
        lib_dir = build.lib_dir

        def run(lib_dir: Path = lib_dir, kind: str = kind) -> dict[str, float]:
            tps, variants[kind] = binding(lib_dir, model, args)
            return tps

        peers[kind] = run
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in peers}
    names = list(peers)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            runs[name].append(peers[name]())
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {runs[n][-1]}" for n in names), file=sys.stderr)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {cpu_model()}; threads={args.threads}")
    print(f"model: {model.name}; {args.rounds} rounds; peer: stock llama-bench ({stock.lib_dir})")
    pairs = [(k, "stock") for k in kinds] + ([("native", "portable")] if args.portable else [])
    report: dict[str, Any] = {"runs": runs, "variants": variants, "ratios": {}}
    print(f"{'workload':10} " + " ".join(f"{n + ' t/s':>16}" for n in names) + "".join(
        f"{a + '/' + b:>24}" for a, b in pairs))  # fmt: skip
    for workload, _, _ in WORKLOADS:
        line = f"{workload:10} " + " ".join(f"{statistics.median(r[workload] for r in runs[n]):16.1f}" for n in names)
        for a, b in pairs:
            ratios = sorted(x[workload] / y[workload] for x, y in zip(runs[a], runs[b], strict=True))
            med = statistics.median(ratios)
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (med, med, med)
            report["ratios"][f"{workload} {a}/{b}"] = {"median": med, "q1": q1, "q3": q3}
            line += f"   {med:6.3f} [{q1:.3f}..{q3:.3f}]"
        print(line)
    print("CPU kernels: " + ", ".join(f"{k}: {v}" for k, v in variants.items()))
    print("(ratios: median over rounds of the paired ratio, [interquartile range])")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
