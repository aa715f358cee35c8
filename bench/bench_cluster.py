"""Two erllama replicas on a local two-node Ray cluster, the same requests through the same client, under
erllama's token-exact prefix router and under Ray Serve's default router (power of two choices): the fleet-wide
share of prompt tokens served from cache, mean / p99 time to first token, and each replica's load.

Workloads (issue 22):
* shared prefix: 4 groups x 8 prompts, a ~1,024-token group document + a ~64-token question, 16-token answers;
  sent in a shuffled order by ``--concurrency`` clients;
* multi-round chat: 4 users x 5 rounds over one ~512-token system prompt, each round resending the conversation so
  far (the history grows), the users concurrent, each user's rounds in order.

Each router gets freshly started replicas (empty caches). The disk tier is off by default (``--disk``: a shared
one), so the numbers compare routing alone: with a shared disk tier a mis-routed request is a disk restore, and
both routers' cached shares rise.

Targets: cached share >= default + 30 points; p99 TTFT <= default's; no replica above 1.5x the median load.

    python bench/bench_cluster.py [--concurrency 4] [--threads 1] [--disk]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is a package of the root

from bench.peers import cpu_model
from erllama.cluster.replica import REPLICA_HEADER

WORDS = [
    "llama",
    "alpaca",
    "valley",
    "river",
    "stone",
    "cache",
    "token",
    "prefix",
    "replica",
    "router",
    "cluster",
    "memory",
    "state",
    "warm",
    "cold",
    "window",
    "summit",
    "harvest",
    "lantern",
    "orchard",
    "meadow",
    "compass",
    "ribbon",
    "marble",
    "canyon",
    "thistle",
    "beacon",
]


@dataclass
class Result:
    workload: str
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    replica: str


@dataclass
class Run:
    router: str
    ram_mb: int
    results: list[Result] = field(default_factory=list)

    def share(self, workload: str | None = None) -> float:
        rs = [r for r in self.results if workload is None or r.workload == workload]
        return sum(r.cached_tokens for r in rs) / max(1, sum(r.prompt_tokens for r in rs))

    def ttft(self, workload: str | None = None) -> tuple[float, float]:
        ts = sorted(r.ttft_s for r in self.results if workload is None or r.workload == workload)
        p99 = ts[min(len(ts) - 1, round(0.99 * (len(ts) - 1)))]
        return statistics.fmean(ts), p99

    def loads(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.replica] = out.get(r.replica, 0) + 1
        return out

    def computed(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.replica] = out.get(r.replica, 0) + r.prompt_tokens - r.cached_tokens
        return out


def text_of(n_tokens: int, seed: int, count: Any) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while True:
        words.extend(rng.choice(WORDS) for _ in range(32))
        text = " ".join(words)
        if count(text) >= n_tokens:
            return text


async def ask(client: httpx.AsyncClient, workload: str, messages: list[dict[str, str]], out: Run) -> str:
    body = {
        "model": "smollm2",
        "messages": messages,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    text = ""
    usage: dict[str, Any] = {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        replica = r.headers[REPLICA_HEADER]
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", ()):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text += piece
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    out.results.append(
        Result(
            workload, ttft if ttft is not None else time.perf_counter() - t0, usage["prompt_tokens"], cached, replica
        )
    )
    return text


async def shared_prefix(base: str, docs: list[str], questions: list[list[str]], concurrency: int, out: Run) -> None:
    jobs = [(g, q) for g in range(len(docs)) for q in range(len(questions[g]))]
    random.Random(7).shuffle(jobs)
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            while not queue.empty():
                g, q = queue.get_nowait()
                messages = [{"role": "system", "content": docs[g]}, {"role": "user", "content": questions[g][q]}]
                await ask(client, "shared-prefix", messages, out)

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))


async def multi_round(base: str, system: str, turns: list[list[str]], out: Run) -> None:
    async def user(rounds: list[str]) -> None:
        messages = [{"role": "system", "content": system}]
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            for said in rounds:
                messages.append({"role": "user", "content": said})
                reply = await ask(client, "multi-round", messages, out)
                messages.append({"role": "assistant", "content": reply})

    await asyncio.gather(*(user(rounds) for rounds in turns))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=2, help="clients sending the shared-prefix prompts")
    ap.add_argument(
        "--ram-cache-mb",
        default="4096,128",
        help="each replica's RAM tier, one run per value: 4096 holds every row (~25 MB each), 128 about five",
    )
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per replica")
    ap.add_argument("--disk", action="store_true", help="give the replicas one shared disk tier")
    ap.add_argument("--routers", default="prefix,default")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from erllama.cluster import ClusterConfig, build
    from erllama.cluster.prompts import VocabModel
    from erllama.testing import fetch

    model = fetch()
    vocab = VocabModel(model)

    def count(text: str) -> int:
        return len(vocab.tokenize(text))

    docs = [f"Group {g} reference. " + text_of(1024, 100 + g, count) for g in range(4)]
    questions = [
        [f"Question {q} for group {g}: " + text_of(60, 1000 * g + q, count) for q in range(8)] for g in range(4)
    ]
    system = "You are the cluster's assistant. " + text_of(512, 42, count)
    turns = [[f"User {u}, round {r}: " + text_of(24, 50 * u + r, count) for r in range(5)] for u in range(4)]

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes.add_node(num_cpus=2)
    ray.init(address=nodes.address, logging_level=logging.ERROR, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8321})
    base = "http://127.0.0.1:8321"
    runs: list[Run] = []
    try:
        for ram_mb, router in [(int(m), r) for m in args.ram_cache_mb.split(",") for r in args.routers.split(",")]:
            kv = tempfile.mkdtemp(prefix="erllama-bench-kv-")
            config = ClusterConfig(
                model=str(model),
                name="smollm2",
                replicas=2,
                max_replicas_per_node=1,
                threads=args.threads,
                ctx=2048,
                parallel=4,
                ram_cache_mb=ram_mb,
                disk_cache_mb=4096 if args.disk else 0,
                kv_dir=kv,
                router=router,
                stats_period_s=0.5,
            )
            serve.run(build(config), name="erllama", route_prefix="/")
            run = Run(router, ram_mb)
            t0 = time.perf_counter()
            asyncio.run(shared_prefix(base, docs, questions, args.concurrency, run))
            asyncio.run(multi_round(base, system, turns, run))
            print(
                f"[{router}, {ram_mb} MB] {len(run.results)} requests in {time.perf_counter() - t0:.1f} s", flush=True
            )
            runs.append(run)
            serve.delete("erllama")
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        nodes.shutdown()  # type: ignore[no-untyped-call]
        vocab.close()
    report(runs)


def report(runs: list[Run]) -> None:
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} CPUs; two replicas, one thread each")
    for ram_mb in sorted({r.ram_mb for r in runs}, reverse=True):
        group = [r for r in runs if r.ram_mb == ram_mb]
        print(f"\nRAM tier {ram_mb} MB per replica")
        print(f"{'router':8} {'workload':14} {'cached share':>12} {'mean TTFT ms':>13} {'p99 TTFT ms':>12}")
        for run in group:
            for w in ("shared-prefix", "multi-round", None):
                mean, p99 = run.ttft(w)
                print(
                    f"{run.router:8} {w or 'all':14} {100 * run.share(w):11.1f}% {1e3 * mean:13.1f} {1e3 * p99:12.1f}"
                )
        for run in group:
            loads = run.loads()
            median = statistics.median(loads.values())
            print(
                f"{run.router:8} requests per replica {sorted(loads.values())},"
                f" max / median {max(loads.values()) / median:.2f};"
                f" prompt tokens computed per replica {sorted(run.computed().values())}"
            )
        by = {r.router: r for r in group}
        if "prefix" in by and "default" in by:
            ours, peer = by["prefix"], by["default"]
            print(
                f"prefix vs default: cached share {100 * ours.share():.1f}% vs {100 * peer.share():.1f}% "
                f"({100 * (ours.share() - peer.share()):+.1f} points; target +30); "
                f"p99 TTFT {ours.ttft()[1] / peer.ttft()[1]:.2f}x default's (target <= 1); "
                f"mean TTFT {ours.ttft()[0] / peer.ttft()[0]:.2f}x"
            )


if __name__ == "__main__":
    main()
