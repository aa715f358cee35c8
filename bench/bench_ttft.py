"""Time to first token of a ~2,000-token prompt on SmolLM2: cold, warm (same prompt) and partial (prompt + ~50).

The peer is the cold run of the same prompt in the same process: the ratio cold/warm is what the cache buys
(target >= 200x). Warm TTFT is printed beside its floor: the state's bytes over this machine's measured memcpy
bandwidth (a restore cannot copy faster) plus one decode step at that context length (the last prompt token is
always recomputed). TTFT is measured by the caller, from submitting the request to holding the first token.

    python bench/bench_ttft.py [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from erllama import Runtime, TextDelta
from erllama._native import ContextConfig, ModelConfig
from erllama.cache import CacheStore, RamTier, RowMeta
from erllama.model import LlamaBackend
from erllama.testing import fetch

PARAGRAPH = (
    "Section {i}. The cache keeps the key-value state of every prompt it has seen under the exact token ids, and a "
    "later request that begins with the same tokens restores that state instead of computing it again. Restoring "
    "is a copy of a few megabytes; computing is a pass of the whole network over every token. "
)


def document(tag: str, n_tokens: int, rt: Runtime, model: str) -> str:
    text = f"Document {tag}.\n"
    i = 0
    while len(rt.tokenize(model, text)) < n_tokens:
        text += PARAGRAPH.format(i=i)
        i += 1
    return text


def ttft(rt: Runtime, model: str, prompt: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    stream = rt.infer(model, prompt, max_tokens=1)
    for event in stream:
        if isinstance(event, TextDelta):
            elapsed = time.perf_counter() - t0
            for _ in stream:  # drain to the end of the request
                pass
            assert stream.completion is not None
            return elapsed, stream.completion.cache_hit_kind
    raise RuntimeError("no token was produced")


def memcpy_bandwidth(n_bytes: int) -> float:
    src = np.ones(n_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    path = fetch()
    cfg = ContextConfig(n_ctx=4096, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads)
    store = CacheStore([RamTier(4 << 30)])
    with Runtime(store) as rt:
        model = rt.load_model(backend=lambda: LlamaBackend(path, ModelConfig(), cfg))
        rt.complete(model, "warm up the threads", max_tokens=4, use_cache=False)
        rows = []
        for r in range(args.rounds):
            prompt = document(f"#{r}", args.tokens, rt, model)
            cold, k0 = ttft(rt, model, prompt)
            store.drain()
            warm, k1 = ttft(rt, model, prompt)
            partial_prompt = prompt + PARAGRAPH.format(i="extra")[:220]
            partial, k2 = ttft(rt, model, partial_prompt)
            store.drain()
            assert (k0, k1, k2) == ("cold", "exact", "partial"), (k0, k1, k2)
            rows.append((cold, warm, partial))
            print(f"round {r}: cold {cold * 1e3:8.1f} ms  warm {warm * 1e3:6.2f} ms  partial {partial * 1e3:7.1f} ms")
        n_prompt = len(rt.tokenize(model, prompt))
        n_partial = len(rt.tokenize(model, partial_prompt))
        prompt_tokens = tuple(rt.tokenize(model, prompt))
        # the row the warm run restored: the prompt's cold row (all of it, or all but its last token)
        state_bytes = max(size for meta, size in _row_sizes(store) if meta.tokens == prompt_tokens[: meta.n_tokens])
        long = rt.complete(model, prompt, max_tokens=33, use_cache=False)
        step = long.stats.generate_s / (long.stats.generated_tokens - 1)
    bandwidth = memcpy_bandwidth(state_bytes)
    floor = state_bytes / bandwidth + step
    cold_ms = statistics.median(r[0] for r in rows) * 1e3
    warm_ms = statistics.median(r[1] for r in rows) * 1e3
    partial_ms = statistics.median(r[2] for r in rows) * 1e3
    ratios = [r[0] / r[1] for r in rows]
    print()
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} threads; SmolLM2-135M-Instruct Q4_1")
    print(f"prompt {n_prompt} tokens, partial {n_partial} tokens; state of the prompt {state_bytes / 1e6:.1f} MB")
    print(f"TTFT median of {args.rounds}: cold {cold_ms:.1f} ms, warm {warm_ms:.2f} ms, partial {partial_ms:.1f} ms")
    print(
        f"cold/warm = {statistics.median(ratios):.0f}x (min {min(ratios):.0f}x, target >= 200x); "
        f"cold/partial = {cold_ms / partial_ms:.1f}x"
    )
    print(
        f"warm floor = {state_bytes / 1e6:.1f} MB / {bandwidth / 1e9:.1f} GB/s memcpy + one decode step "
        f"{step * 1e3:.2f} ms = {floor * 1e3:.2f} ms; warm / floor = {warm_ms / (floor * 1e3):.2f}"
    )


def _row_sizes(store: CacheStore) -> list[tuple[RowMeta, int]]:
    out = []
    for meta in store.tiers[0].metas():
        row = store.tiers[0].load(meta.key)
        if row is not None:
            out.append((meta, len(row[1])))
    return out


if __name__ == "__main__":
    main()
