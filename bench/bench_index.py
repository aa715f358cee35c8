"""Prefix-index lookup time against the number of stored rows and the prompt length.

    python bench/bench_index.py

Rows are realistic: many conversations sharing a system prompt, each a few hundred tokens long. For each store
size (1 to 10,000 rows) and prompt length, the table gives the mean lookup time of the index and of the obvious
peer measured in the same run: probing every stored length with a key hash of that prefix (what a per-length
hash lookup costs; the reference hashed the whole prompt once per stored length). The index should be flat in the
number of rows; the peer grows with the number of distinct stored lengths.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erllama.cache.index import PrefixIndex
from erllama.cache.key import Namespace, cache_key, ctx_params_hash

NS = Namespace("ab" * 32, "Q4_1", ctx_params_hash({"n_ctx": 8192}))
SIZES = (1, 10, 100, 1_000, 10_000)
PROMPTS = (64, 512, 2048)


def make_rows(n: int, rng: np.random.Generator, system: np.ndarray) -> list[np.ndarray]:
    rows = []
    for _ in range(n):
        user = rng.integers(0, 49152, size=int(rng.integers(20, 400)), dtype=np.int32)
        rows.append(np.concatenate([system, user]))
    return rows


def time_per_call(fn: object, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    rng = np.random.default_rng(0)
    system = rng.integers(0, 49152, size=300, dtype=np.int32)
    print(f"{'rows':>7} {'prompt':>7} {'index us':>10} {'per-length peer us':>19} {'peer/index':>11}")
    times: dict[tuple[int, int], float] = {}
    for n_rows in SIZES:
        rows = make_rows(n_rows, rng, system)
        index = PrefixIndex()
        stored: dict[bytes, int] = {}
        for row in rows:
            stored[index.add(NS, row)] = len(row)
        lengths = sorted(set(stored.values()), reverse=True)
        for n_prompt in PROMPTS:
            # the prompt continues the first stored conversation when it is long enough, else a fresh one
            head = rows[0][:n_prompt]
            extra = rng.integers(0, 49152, size=max(0, n_prompt - len(head)), dtype=np.int32)
            prompt = np.concatenate([head, extra])

            def lookup(prompt: np.ndarray = prompt, index: PrefixIndex = index) -> object:
                return index.longest_prefix(NS, prompt, max_tokens=len(prompt) - 1)

            def peer(
                prompt: np.ndarray = prompt, lengths: list[int] = lengths, stored: dict[bytes, int] = stored
            ) -> object:
                for n in lengths:
                    if n < len(prompt) and cache_key(NS, prompt[:n]) in stored:
                        return n
                return None

            t_index = time_per_call(lookup, 50)
            t_peer = time_per_call(peer, 3 if len(lengths) > 100 else 20)
            times[(n_rows, n_prompt)] = t_index
            print(f"{n_rows:7d} {n_prompt:7d} {t_index * 1e6:10.1f} {t_peer * 1e6:19.1f} {t_peer / t_index:11.1f}")
    flat = ", ".join(f"{n} tokens: {times[(SIZES[-1], n)] / times[(SIZES[0], n)]:.2f}" for n in PROMPTS)
    print(f"index lookup time at {SIZES[-1]:,} rows / at {SIZES[0]} row: {flat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
