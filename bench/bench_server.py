"""The daemon against llama-server, both over HTTP, in one run: cold TTFT, aggregate tokens/s with concurrent
streams, and the rotating multi-conversation workload.

Both serve SmolLM2-135M-Instruct Q4_1 from the same llama.cpp source (``python -m erllama serve`` on erllama's
build, ``llama-server`` from the stock build: ``bench/peers.py``), with the same threads, slots, context per slot,
batch size
and flash attention off, and get the same requests through the same client code (``/v1/completions``, streaming;
TTFT is the arrival of the first chunk with text):

* **cold TTFT** — distinct ~``--cold-tokens`` prompts, one at a time: nothing to reuse on either side. Target <= 1.1x.

* **streams** — ``--streams`` concurrent requests (distinct 128-token prompts, 128 tokens each, end-of-generation
  tokens banned through ``logit_bias`` on both sides); aggregate completion tokens / wall time. Target >= 1.0x.
  Both servers stay up for the whole comparison (one idles while the other runs) and runs alternate between them,
  so each pair of runs sees the same machine; every run sends prompts that start with a token of their own, so
  neither side reuses anything from an earlier run. Also reported: each server's CPU during a run, split into its
  ``--threads`` busiest threads (ggml's compute threads) and all the others (HTTP, event loop), from per-thread
  schedstat.

The cold and streams runs are repeated ``--repeat`` times, interleaved (alternating which side goes first), and
medians are compared, with the median of the per-pair ratios beside them: on a small shared VM one run of either
side can be 10% off.
* **rotating** — 8 documents of ~``--tokens`` tokens, a new question each time, round-robin over 4 slots
  (``bench_rotating.py``'s workload, now through the daemon). Steady-state mean TTFT after one warm-up round,
  against llama-server with ``--cache-ram 0`` (slots only) and as shipped (host-memory prompt cache on).
  Target <= 0.3x against the slots-only server.

    python -m bench.bench_server [--threads N] [--streams 8] [--cold 2] [--repeat 5] [--tokens 2000] [--rounds 2]
                                 [--skip-rotating | --only-rotating]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from bench.bench_rotating import QUESTIONS, documents
from bench.peers import stock_tool
from erllama._native import Model, ModelConfig
from erllama.testing import fetch, wait_until_up

N_STREAM_PROMPT, N_STREAM_GEN = 128, 128
# a new connection per request on both sides: cpp-httplib closes kept-alive connections after a few requests,
# and a client reusing one it just closed sees "server disconnected"
_FRESH = httpx.Limits(max_connections=64, max_keepalive_connections=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class Served:
    base: str  # the base URL
    pid: int


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each thread of a process: Linux's schedstat (nanoseconds on the CPU), else psutil's
    user + system times (clock-tick sampled, which undercounts threads that run in short bursts, like HTTP ones)."""
    tasks = Path(f"/proc/{pid}/task")
    if tasks.is_dir():
        out = {}
        for task in tasks.iterdir():
            with contextlib.suppress(OSError, ValueError):  # a thread that just ended
                out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        return out
    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def cpu_split(before: dict[int, float], after: dict[int, float], n_compute: int) -> tuple[float, float]:
    """(the ``n_compute`` busiest threads, every other thread): CPU seconds used between two ``thread_cpu`` calls."""
    used = sorted((cpu - before.get(tid, 0.0) for tid, cpu in after.items()), reverse=True)
    return sum(used[:n_compute]), sum(used[n_compute:])


@contextlib.contextmanager
def serving(
    kind: str, model: str, threads: int, slots: int, ctx_per_slot: int, *, extra: list[str]
) -> Iterator[Served]:
    """Start ``erllama`` or ``llama-server`` on a free port; yield its base URL and pid."""
    port = _free_port()
    if kind == "erllama":
        kv = tempfile.mkdtemp(prefix="erllama-bench-kv-")
        cmd = [
            sys.executable, "-m", "erllama", "serve", "--model", model, "--name", "m", "--port", str(port),
            "--threads", str(threads), "--parallel", str(slots), "--ctx", str(ctx_per_slot), "--batch", "512",
            "--flash-attn", "off", "--ram-cache-mb", "8192", "--disk-cache-mb", "0", "--kv-dir", kv,
            "--log-level", "warning", *extra,
        ]  # fmt: skip
    else:
        cmd = [
            str(stock_tool("llama-server")), "-m", model, "-a", "m", "-t", str(threads), "-tb", str(threads),
            "-c", str(slots * ctx_per_slot), "-np", str(slots), "-b", "512", "-fa", "off",
            "--host", "127.0.0.1", "--port", str(port), *extra,
        ]  # fmt: skip
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{kind}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(f"{base}/health", proc, timeout_s=180, what=kind)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {' '.join(cmd)} (log: {log.name})") from None
        yield Served(base, proc.pid)
    except BaseException:
        print(f"{kind} failed; its log: {log.name}", file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(60)


async def _one(client: httpx.AsyncClient, prompt: str, max_tokens: int, bias: dict[str, float]) -> tuple[float, int]:
    """(TTFT, completion tokens) of one streamed completion."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if bias:
        body["logit_bias"] = bias
    t0 = time.perf_counter()
    first, pieces = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                pieces += 1
                if first is None:
                    first = time.perf_counter() - t0
    assert first is not None, "no text streamed"
    return first, pieces


def cold(base: str, prompts: list[str]) -> list[float]:
    async def go() -> list[float]:
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=_FRESH) as c:
            return [(await _one(c, p, 4, {}))[0] for p in prompts]

    return asyncio.run(go())


def streams(base: str, prompts: list[str], bias: dict[str, float]) -> tuple[float, int]:
    async def go() -> tuple[float, int]:
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=_FRESH) as c:
            await _one(c, "warm up", 4, {})
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_one(c, p, N_STREAM_GEN, bias) for p in prompts))
            wall = time.perf_counter() - t0
        n = sum(k for _, k in results)
        return n / wall, n

    return asyncio.run(go())


def rotating(base: str, prompts: list[str]) -> list[float]:
    async def go() -> list[float]:
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=_FRESH) as c:
            out = []
            for p in prompts:
                out.append((await _one(c, p, 8, {}))[0])
            return out

    return asyncio.run(go())


def _stream_prompts(model: Model, n: int, runs: int) -> list[list[str]]:
    """``runs`` sets of ``n`` prompts of ``N_STREAM_PROMPT - 1`` tokens; no two share their first token."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    heads: list[str] = []  # single-token words, each its own first token
    for t in range(1000, model.n_vocab):
        piece = model.detokenize([t])
        if len(heads) < n * runs and piece.isalpha() and model.tokenize(piece, add_special=False) == [t]:
            heads.append(piece)
    out = []
    for r in range(runs):
        prompts = []
        for i in range(n):
            body = " ".join(words[(i + j) % len(words)] for j in range(400))
            toks = model.tokenize(f"{heads[r * n + i]} {body}", add_special=False)
            prompts.append(model.detokenize(toks[: N_STREAM_PROMPT - 1]))
        out.append(prompts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--cold", type=int, default=2, help="cold prompts per side and repeat")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repeats of the cold and streams runs")
    ap.add_argument("--cold-tokens", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=2000, help="tokens per rotating document")
    ap.add_argument("--rounds", type=int, default=2, help="measured rotating rounds after one warm-up")
    ap.add_argument("--skip-rotating", action="store_true")
    ap.add_argument("--only-rotating", action="store_true")
    args = ap.parse_args()
    path = str(fetch())
    with Model(path, ModelConfig(vocab_only=True)) as vocab:
        eog = [t for t in range(vocab.n_vocab) if vocab.is_eog(t)]
        stream_prompts = _stream_prompts(vocab, args.streams, 2 * args.repeat)
    bias = {str(t): -100.0 for t in eog}
    results: dict[str, dict[str, list[float]]] = {
        kind: {"cold": [], "streams": [], "compute_cpu": [], "other_cpu": []} for kind in ("erllama", "llama-server")
    }
    sides = ("erllama", "llama-server")
    for rep in range(0 if args.only_rotating else args.repeat):
        # interleaved, alternating who goes first: slow drift of the machine hits both sides alike
        for kind in sides if rep % 2 == 0 else sides[::-1]:
            # cold TTFT: fresh documents, unlike anything seen before (a different tag per side, repeat and prompt)
            docs = documents(args.cold, args.cold_tokens)
            prompts = [f"[{kind} {rep} {i}] {d}\nQuestion: what is this about?\nAnswer:" for i, d in enumerate(docs)]
            with serving(kind, path, args.threads, 1, args.cold_tokens + 512, extra=[]) as srv:
                results[kind]["cold"] += cold(srv.base, prompts)
        done = ", ".join(f"{k} {[round(x * 1e3) for x in results[k]['cold']]} ms" for k in sides)
        print(f"repeat {rep}: cold {done}", flush=True)
    if not args.only_rotating:
        ctx = 2 * (N_STREAM_PROMPT + N_STREAM_GEN)
        with contextlib.ExitStack() as stack:
            up = {k: stack.enter_context(serving(k, path, args.threads, args.streams, ctx, extra=[])) for k in sides}
            runs = iter(stream_prompts)
            for rep in range(args.repeat):
                for kind in sides if rep % 2 == 0 else sides[::-1]:
                    r, srv = results[kind], up[kind]
                    before = thread_cpu(srv.pid)
                    r["streams"].append(streams(srv.base, next(runs), bias)[0])
                    compute, other = cpu_split(before, thread_cpu(srv.pid), args.threads)
                    r["compute_cpu"].append(compute)
                    r["other_cpu"].append(other)
                print(f"repeat {rep}: streams " + ", ".join(f"{k} {results[k]['streams'][-1]:.1f}" for k in sides)
                      + " tok/s", flush=True)  # fmt: skip
    rot: dict[str, list[float]] = {}
    if not args.skip_rotating:
        docs = documents(8, args.tokens)
        prompts = [
            f"{d}\nQuestion: {QUESTIONS[k % len(QUESTIONS)]}\nAnswer:" for k in range(1 + args.rounds) for d in docs
        ]
        for name, kind, extra in (
            ("erllama", "erllama", []),
            ("llama-server --cache-ram 0", "llama-server", ["--cache-ram", "0"]),
            ("llama-server default", "llama-server", []),
        ):
            with serving(kind, path, args.threads, 4, args.tokens + 512, extra=extra) as srv:
                rot[name] = rotating(srv.base, prompts)
            print(name, [round(x * 1e3) for x in rot[name]], flush=True)

    print()
    print(
        f"machine: {os.cpu_count()} CPUs, {args.threads} threads; {Path(path).name}; both over HTTP, "
        "llama-server from the stock build of the same source"
    )
    if results["erllama"]["cold"]:
        _report(results, args)
    if rot:
        steady = {name: statistics.mean(xs[8:]) for name, xs in rot.items()}
        base_ = steady["erllama"]
        print(f"rotating (8 docs x ~{args.tokens} tokens, 4 slots, {args.rounds} rounds after 1 warm-up), "
              f"steady-state mean TTFT:")  # fmt: skip
        for name, v in steady.items():
            print(f"  {name:28s} {v * 1e3:8.1f} ms   erllama / this = {base_ / v:.3f}x")
        print("  target: <= 0.3x against llama-server --cache-ram 0")


def _report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    ours, peer = results["erllama"], results["llama-server"]
    cold_ours, cold_peer = statistics.median(ours["cold"]), statistics.median(peer["cold"])
    tps_ours, tps_peer = statistics.median(ours["streams"]), statistics.median(peer["streams"])
    pairs = [a / b for a, b in zip(ours["streams"], peer["streams"], strict=True)]
    per_rep = [f"{x:.3f}" for x in pairs]
    print(f"cold TTFT (~{args.cold_tokens} tokens, {len(ours['cold'])} prompts each, median): erllama "
          f"{cold_ours * 1e3:.0f} ms, llama-server {cold_peer * 1e3:.0f} ms -> {cold_ours / cold_peer:.3f}x "
          f"(target <= 1.1x)")  # fmt: skip
    print(f"{args.streams} concurrent streams x {N_STREAM_GEN} tokens ({args.repeat} repeats, median): erllama "
          f"{tps_ours:.1f} tok/s, llama-server {tps_peer:.1f} tok/s -> {tps_ours / tps_peer:.3f}x (target >= 1.0x); "
          f"per pair {', '.join(per_rep)} (median {statistics.median(pairs):.3f}x)")  # fmt: skip
    for kind, r in results.items():  # where the CPU went during each streams run (the client's is not counted)
        compute, other = statistics.median(r["compute_cpu"]), statistics.median(r["other_cpu"])
        print(f"  {kind:12s} CPU per streams run (median): the {args.threads} busiest threads (compute) "
              f"{compute:.2f} s, all other threads {other:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
