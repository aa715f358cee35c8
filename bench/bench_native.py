"""Prefill and decode tokens/s through erllama's binding against llama-bench, built from the same source.

    python bench/bench_native.py                  # SmolLM2-135M Q4_1, pp512 / tg128, all cores
    python bench/bench_native.py --rounds 5 --threads 2 --model path/to/model.gguf

Both sides run the workloads llama-bench defines:

* ``pp``: clear the KV cache, decode ``n_prompt`` random tokens (BOS first) as one batch;
* ``tg``: clear the KV cache, decode ``n_gen`` tokens one at a time, each a random token, logits of each computed.

Same model, same threads, same n_ctx (n_prompt + n_gen), n_batch, n_ubatch, flash attention off, F16 KV cache.
erllama's side goes through the public owner classes (``Batch``, ``Context.decode`` with its validation), so the
ratio is the cost of the binding. The two peers alternate for ``--rounds`` rounds and each side's median t/s is
compared, which keeps slow drift of a shared machine from landing on one side only. A third line reports decoding
with erllama's greedy ``Sampler`` in the loop, i.e. what a generation step really costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_llama  # noqa: E402
from erllama._native import Batch, Context, ContextConfig, FlashAttention, Model, Sampler  # noqa: E402
from erllama.testing import fetch  # noqa: E402


def run_llama_bench(tool: Path, model: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        str(tool),
        "-m",
        str(model),
        "-p",
        str(args.n_prompt),
        "-n",
        str(args.n_gen),
        "-t",
        str(args.threads),
        "-b",
        str(args.n_batch),
        "-ub",
        str(args.n_ubatch),
        "-fa",
        "0",
        "-r",
        str(args.reps),
        "-o",
        "json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = {}
    for row in json.loads(out):
        kind = "pp" if row["n_prompt"] > 0 else "tg"
        result[kind] = float(row["avg_ts"])
    return result


class Binding:
    """The same two workloads through erllama."""

    def __init__(self, model_path: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.model = Model(model_path)
        cfg = ContextConfig(
            n_ctx=args.n_prompt + args.n_gen,
            n_batch=args.n_batch,
            n_ubatch=args.n_ubatch,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            flash_attn=FlashAttention.OFF,
        )
        self.ctx = Context(self.model, cfg)
        self.sampler = Sampler(self.model)
        self.rng = np.random.default_rng(0)
        self.step = Batch(1)
        self.prompt = Batch(args.n_prompt)

    def close(self) -> None:
        self.sampler.close()
        self.ctx.close()
        self.model.close()

    def _random_tokens(self, n: int) -> np.ndarray:
        tokens = self.rng.integers(0, self.model.n_vocab, size=n, dtype=np.int32)
        if self.model.info.add_bos:
            tokens[0] = self.model.info.bos
        return tokens

    def pp(self) -> float:
        self.ctx.clear(data=False)
        tokens = self._random_tokens(self.args.n_prompt)
        t0 = time.perf_counter()
        for off in range(0, len(tokens), self.args.n_batch):
            self.prompt.clear()
            self.prompt.add_sequence(tokens[off : off + self.args.n_batch], off, 0)
            self.ctx.decode(self.prompt)
        return len(tokens) / (time.perf_counter() - t0)

    def tg(self, sample: bool = False) -> float:
        self.ctx.clear(data=False)
        n = self.args.n_gen
        tokens = self._random_tokens(n)
        step, ctx = self.step, self.ctx
        token = int(tokens[0])
        t0 = time.perf_counter()
        for i in range(n):
            step.clear()
            step.add(token, i, 0, True)
            ctx.decode(step)
            token = self.sampler.sample(ctx, 0) if sample else int(tokens[(i + 1) % n])
        return float(n / (time.perf_counter() - t0))

    def run(self) -> dict[str, float]:
        reps = self.args.reps
        self.pp()  # warm-up, as llama-bench does
        self.tg()
        return {
            "pp": statistics.mean(self.pp() for _ in range(reps)),
            "tg": statistics.mean(self.tg() for _ in range(reps)),
            "tg+sample": statistics.mean(self.tg(sample=True) for _ in range(reps)),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF to measure (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--n-ubatch", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3, help="repetitions per round (llama-bench -r)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of peer and binding")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    build = build_llama.ensure_built(build_llama.BuildOptions(with_tools=True))
    model = args.model or fetch()
    binding = Binding(model, args)
    peer_runs: list[dict[str, float]] = []
    ours_runs: list[dict[str, float]] = []
    try:
        for r in range(args.rounds):
            peer_runs.append(run_llama_bench(build.tools["llama-bench"], model, args))
            ours_runs.append(binding.run())
            print(
                f"round {r + 1}/{args.rounds}: llama-bench {peer_runs[-1]}  erllama {ours_runs[-1]}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        binding.close()

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    pp_name, tg_name = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    rows = [
        (f"prefill {pp_name}", med(peer_runs, "pp"), med(ours_runs, "pp")),
        (f"decode  {tg_name}", med(peer_runs, "tg"), med(ours_runs, "tg")),
        (f"decode  {tg_name} + greedy sampler", med(peer_runs, "tg"), med(ours_runs, "tg+sample")),
    ]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; threads={args.threads}")
    print(f"model: {model.name}; libllama {build.source.source_id[:16]} ({build.lib_dir})")
    print(f"{'workload':40} {'llama-bench t/s':>16} {'erllama t/s':>12} {'ratio':>7}")
    for name, peer, ours in rows:
        print(f"{name:40} {peer:16.2f} {ours:12.2f} {ours / peer:7.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "peer": peer_runs,
                    "erllama": ours_runs,
                    "threads": args.threads,
                    "model": model.name,
                    "ratios": {name.strip(): ours / peer for name, peer, ours in rows},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
