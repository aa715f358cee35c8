"""Aggregate decode tokens/s with 1, 4 and 8 concurrent streams: the runtime vs ``llama-batched-bench``.

Both run SmolLM2-135M-Instruct Q4_1 from the same llama.cpp source (the peer from ``build_llama.py --stock``), the same
threads, n_ctx, n_batch and flash-attention setting, with ``npl`` sequences of a 128-token prompt each generating
128 tokens. The peer's S_TG is ``npl * ntg / time of the generation steps``; ours is the number of tokens all streams
produced while all of them were generating, over that window, as the client sees them (every token sampled with a
real greedy sampler, detokenised and streamed; llama-batched-bench samples nothing). Rounds alternate ours / peer
and the ratio is reported per round and as the median. Target: >= 0.9x.

    python bench/bench_batched.py [--rounds 3] [--npl 1,4,8] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import time

from bench.peers import stock_tool
from erllama import Runtime, TextDelta
from erllama._native import ContextConfig, FlashAttention, ModelConfig
from erllama.model import LlamaBackend, SamplerConfig
from erllama.testing import fetch

N_PP, N_TG, N_CTX, N_BATCH = 128, 128, 4096, 512


def peer(model: str, npl: int, threads: int) -> float:
    tool = stock_tool("llama-batched-bench")
    cmd = [
        str(tool), "-m", model, "-c", str(N_CTX), "-b", str(N_BATCH), "-ub", str(N_BATCH),
        "-npp", str(N_PP), "-ntg", str(N_TG), "-npl", str(npl), "-t", str(threads), "-fa", "off",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[2] == str(npl) and re.fullmatch(r"[\d.]+", cells[7]):
            return float(cells[7])
    raise RuntimeError(f"no S_TG row in llama-batched-bench output:\n{out}")


async def _streams(rt: Runtime, model: str, prompts: list[list[int]], sampling: SamplerConfig) -> list[list[float]]:
    async def one(prompt: list[int]) -> list[float]:
        stamps = []
        async for event in rt.infer(model, prompt, max_tokens=N_TG, sampling=sampling, use_cache=False):
            if isinstance(event, TextDelta):
                stamps.append(time.perf_counter())
        return stamps

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def ours(rt: Runtime, model: str, npl: int, eog: list[int]) -> float:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    prompts = []
    for i in range(npl):
        toks = rt.tokenize(model, " ".join(words[(i + j) % len(words)] for j in range(400)))
        prompts.append(toks[:N_PP])
    sampling = SamplerConfig(logit_bias={t: float("-inf") for t in eog})  # no early stop, like the peer
    stamps = asyncio.run(_streams(rt, model, prompts, sampling))
    assert all(len(s) == N_TG for s in stamps), [len(s) for s in stamps]
    start = max(s[0] for s in stamps)  # every stream is generating from here on
    end = min(s[-1] for s in stamps)  # ... until the first one finishes
    n = sum(sum(1 for t in s if start < t <= end) for s in stamps)
    return n / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--npl", default="1,4,8")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    path = str(fetch())
    results: dict[int, list[tuple[float, float]]] = {}
    for npl in [int(x) for x in args.npl.split(",")]:
        cfg = ContextConfig(
            n_ctx=N_CTX,
            n_batch=N_BATCH,
            n_seq_max=npl,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            flash_attn=FlashAttention.OFF,
        )
        with Runtime(None) as rt:
            model = rt.load_model(backend=lambda cfg=cfg: LlamaBackend(path, ModelConfig(), cfg))  # type: ignore[misc]
            eog = sorted(rt.model_info(model)["eog_tokens"])
            # warm-up: a lone request first, as on any server that has served one (sequences are then reused in
            # the order they were freed; a FIFO of free ids once made every step two passes over the weights)
            rt.complete(model, "warm up", max_tokens=4, use_cache=False)
            ours(rt, model, npl, eog)
            for r in range(args.rounds):
                a = ours(rt, model, npl, eog)
                b = peer(path, npl, args.threads)
                results.setdefault(npl, []).append((a, b))
                print(f"npl {npl} round {r}: erllama {a:7.1f} tok/s  llama-batched-bench {b:7.1f} tok/s  {a / b:.3f}x")
    print()
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} threads; SmolLM2-135M-Instruct Q4_1, pp {N_PP}, tg {N_TG}")
    for npl, rows in results.items():
        ratios = [a / b for a, b in rows]
        print(
            f"npl {npl}: erllama {statistics.median(a for a, _ in rows):.1f} tok/s, peer "
            f"{statistics.median(b for _, b in rows):.1f} tok/s, ratio median {statistics.median(ratios):.3f}x "
            f"[{min(ratios):.3f}..{max(ratios):.3f}] (target >= 0.9x)"
        )


if __name__ == "__main__":
    main()
