"""Prefill and decode tokens/s through erllama's binding against llama-bench from the stock build of the same source.

    python bench/bench_native.py                  # SmolLM2-135M Q4_1, pp512 / tg128, all cores
    python bench/bench_native.py --rounds 7 --threads 2 --model path/to/model.gguf

Both sides run the workloads llama-bench defines:

* ``pp``: clear the KV cache, decode ``n_prompt`` random tokens (BOS first) as one batch;
* ``tg``: clear the KV cache, decode ``n_gen`` tokens one at a time, each a random token, logits of each computed.

Same model, same threads, n_batch, n_ubatch, flash attention off, F16 KV cache, and, as llama-bench does, a context
sized for each test (n_ctx = n_prompt for pp, n_gen for tg: the KV size decides how many cells attention reads).
erllama's side goes through the public owner classes (``Batch``, ``Context.decode`` with its validation), so the
ratio is the cost of the binding. The two peers alternate for ``--rounds`` short rounds, back to back and in ABBA
order; the table gives each side's median t/s, the median over rounds of the paired ratio erllama / llama-bench
(which cancels the slow drift of a shared machine) with its interquartile range, and the ratio of the best rounds
(the least disturbed measurement of each side). A third line reports decoding with erllama's greedy ``Sampler`` in
the loop, i.e. what a generation step really costs (llama-bench does not sample).

Two in-process diagnostics follow, immune to drift between processes: the Python-side cost of one decode step
(batch fill, validation, output bookkeeping) next to the measured step time, and an A/B of erllama's decode loop
against a bare cffi loop calling ``llama_decode`` on the same context, interleaved repetition by repetition.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_llama  # noqa: E402
from erllama._native import Batch, Context, ContextConfig, FlashAttention, Model, Sampler  # noqa: E402
from erllama._native.loader import lib  # noqa: E402
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
            n_batch=args.n_batch,
            n_ubatch=args.n_ubatch,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            flash_attn=FlashAttention.OFF,
        )
        self.pp_ctx = Context(self.model, dataclasses.replace(cfg, n_ctx=args.n_prompt))
        self.ctx = Context(self.model, dataclasses.replace(cfg, n_ctx=args.n_gen))
        self.sampler = Sampler(self.model)
        self.rng = np.random.default_rng(0)
        self.step = Batch(1)
        self.prompt = Batch(args.n_prompt)

    def close(self) -> None:
        self.sampler.close()
        self.pp_ctx.close()
        self.ctx.close()
        self.model.close()

    def _random_tokens(self, n: int) -> np.ndarray:
        tokens = self.rng.integers(0, self.model.n_vocab, size=n, dtype=np.int32)
        if self.model.info.add_bos:
            tokens[0] = self.model.info.bos
        return tokens

    def pp(self) -> float:
        self.pp_ctx.clear(data=False)
        tokens = self._random_tokens(self.args.n_prompt)
        t0 = time.perf_counter()
        for off in range(0, len(tokens), self.args.n_batch):
            self.prompt.clear()
            self.prompt.add_sequence(tokens[off : off + self.args.n_batch], off, 0)
            self.pp_ctx.decode(self.prompt)
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

    def tg_bare(self) -> float:
        """The tg workload with no binding at all: llama_decode called through cffi on a prepared struct."""
        self.ctx.clear(data=False)
        n = self.args.n_gen
        tokens = self._random_tokens(n)
        decode, handle, step = lib().llama_decode, self.ctx.handle, self.step
        step.clear()
        step.add(int(tokens[0]), 0, 0, True)
        struct = step.as_struct()
        t0 = time.perf_counter()
        for i in range(n):
            step.token[0] = tokens[i]
            step.pos[0] = i
            if decode(handle, struct) != 0:
                raise RuntimeError("llama_decode failed")
        return float(n / (time.perf_counter() - t0))

    def step_overhead_s(self) -> float:
        """Python-side seconds per decode step, everything but llama_decode itself."""
        ctx, step = self.ctx, self.step
        ctx.clear(data=False)
        ctx.decode_tokens([int(self._random_tokens(1)[0])])
        pos = ctx.seq_len(0)

        def one() -> None:
            step.clear()
            step.add(1, pos, 0, True)
            ctx._validate(step)
            step.as_struct()
            ctx._outputs = step.logits[: step.n_tokens].copy()

        n = 20_000
        return timeit.timeit(one, number=n) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF to measure (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--n-ubatch", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2, help="repetitions per round (llama-bench -r)")
    parser.add_argument("--rounds", type=int, default=16, help="alternating rounds of peer and binding")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    build = build_llama.ensure_built(build_llama.BuildOptions())
    peer_tool = build_llama.ensure_built(build_llama.BuildOptions(stock=True)).tools["llama-bench"]
    model = args.model or fetch()
    binding = Binding(model, args)
    peer_runs: list[dict[str, float]] = []
    ours_runs: list[dict[str, float]] = []
    try:
        for r in range(args.rounds):
            # ABBA order: alternate who goes first, so a trend in the machine's speed lands on both sides.
            if r % 2 == 0:
                peer_runs.append(run_llama_bench(peer_tool, model, args))
                ours_runs.append(binding.run())
            else:
                ours_runs.append(binding.run())
                peer_runs.append(run_llama_bench(peer_tool, model, args))
            print(
                f"round {r + 1}/{args.rounds}: llama-bench {peer_runs[-1]}  erllama {ours_runs[-1]}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        binding.close()

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    def best(runs: list[dict[str, float]], key: str) -> float:
        return max(run[key] for run in runs)

    pp_name, tg_name = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    rows = [
        (f"prefill {pp_name}", "pp", "pp"),
        (f"decode  {tg_name}", "tg", "tg"),
        (f"decode  {tg_name} + greedy sampler", "tg", "tg+sample"),
    ]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; threads={args.threads}")
    print(f"model: {model.name}; libllama {build.source.source_id[:16]} ({build.lib_dir}); {args.rounds} rounds")
    print(f"{'workload':36} {'llama-bench t/s':>16} {'erllama t/s':>12} {'ratio':>7} {'best/best':>10}")
    ratios = {}
    for name, peer_key, our_key in rows:
        pairs = sorted(o[our_key] / p[peer_key] for p, o in zip(peer_runs, ours_runs, strict=True))
        paired = statistics.median(pairs)
        q1, _, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (paired, paired, paired)
        bb = best(ours_runs, our_key) / best(peer_runs, peer_key)
        ratios[name.strip()] = {"paired_median": paired, "q1": q1, "q3": q3, "best_over_best": bb}
        print(
            f"{name:36} {med(peer_runs, peer_key):16.2f} {med(ours_runs, our_key):12.2f} {paired:7.3f} "
            f"{bb:10.3f}   [{q1:.3f} .. {q3:.3f}]"
        )
    print(
        "(t/s: medians over rounds; ratio: median over rounds of erllama/llama-bench measured back to back, "
        "[interquartile range of those paired ratios])"
    )

    binding = Binding(model, args)
    try:
        overhead = binding.step_overhead_s()
        ab: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            ab.append((binding.tg(), binding.tg_bare()))
    finally:
        binding.close()
    step_s = 1.0 / best(ours_runs, "tg")
    ab_ratio = statistics.median(ours / bare for ours, bare in ab)
    print(
        f"in-process: Python-side cost per decode step {overhead * 1e6:.1f} us of a {step_s * 1e3:.2f} ms step "
        f"({overhead / step_s:.3%}); erllama decode loop / bare cffi llama_decode loop, interleaved: "
        f"{ab_ratio:.3f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "peer": peer_runs,
                    "erllama": ours_runs,
                    "threads": args.threads,
                    "model": model.name,
                    "ratios": ratios,
                    "step_overhead_us": overhead * 1e6,
                    "ab_ratio": ab_ratio,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
