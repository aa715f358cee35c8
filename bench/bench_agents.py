"""The peers' prefix-cache benchmarks as standing gates (issue 23), each against its peer in the same run.

Three servers of SmolLM2-135M-Instruct Q4_1, the same threads, slots, context, batch, flash attention off:
``erllama serve`` (RAM tier, and a disk tier where a workload says so), ``erllama serve --no-cache`` (the same
runtime with nothing to reuse) and ``llama-server`` from the stock build of the same llama.cpp source, as shipped
(its slot reuse and host-memory prompt cache, ``--cache-ram``, on). Every request asks for one token
(``max_tokens`` 1), so its latency is its time to first token, and recorded turns replace the replies, as a trace
replay does. Restored tokens are read from ``x-erllama-cache`` (erllama) and ``timings.cache_n`` /
``usage.cache_read_input_tokens`` (llama-server).

Workloads (llama.cpp's radix-bench shapes, LMCache's multi-round QA, a restart, agent traces):

* ``dual``: two sessions alternating over one shared 512-token prefix, each growing 64 tokens a turn. Mean TTFT
  after the first pair. Gate: <= 0.3x of no-cache; llama-server (host cache on) beside it.
* ``unique``: distinct prompts (no shared first token), one at a time. Gate: <= 1.03x of no-cache (what keeping a
  cache costs a workload it cannot help).
* ``shared``: 4 groups x 8 prompts over a 1,024-token prefix per group, ``--slots`` at a time. Gate: >= 2x the
  requests/s of no-cache.
* ``qa``: 4 users x 5 rounds, a 512-token system prompt shared by all, a 1,024-token history each; erllama's RAM
  tier is smaller than the histories (``--qa-ram-mb``), so its disk tier serves. Mean and p99 TTFT against
  llama-server.
* ``restart``: a 2,000-token conversation, then five rounds of: its next turn served warm from RAM, ``kill -9``, a
  restart, its next turn as the first request (served by the disk tier). Medians compared. Gate: <= 1.2x.
  llama-server restarts empty.
* ``agents``: a 12-turn tool loop resent whole each turn through all three dialects (the share of prompt tokens
  restored on turns 2..12 must equal its ceiling: every token it shares with an earlier prompt), and the
  Claude-Code-shaped session (a new billing header every request, ``cache_control`` breakpoints, parallel results
  replayed reordered): >= 95%; llama-server on the same session beside it.

    python -m bench.bench_agents [--only dual,unique,shared,qa,restart,agents] [--threads N] [--slots 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.bench_server import serving
from bench.peers import cpu_model
from erllama._native import Model, ModelConfig
from erllama.cache.report import parse_header
from erllama.cluster.prompts import VocabModel
from erllama.testing import fetch, free_port, wait_until_up
from erllama.testing.agents import ceiling, claude_code_session, prompt_tokens, tool_loop, words

ALL = ("dual", "unique", "shared", "qa", "restart", "agents")
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "ollama": "/api/chat"}
GATES: list[tuple[str, str, bool]] = []  # (name, measured, passed)


def gate(name: str, measured: str, passed: bool) -> None:
    GATES.append((name, measured, passed))
    print(f"  GATE {name}: {measured} -> {'PASS' if passed else 'FAIL'}", flush=True)


# -- requests ---------------------------------------------------------------------------------------------------


def send(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[float, int | None, int | None]:
    """(latency, restored tokens, prompt tokens) of one request (the counts None where the server says nothing)."""
    t0 = time.perf_counter()
    r = client.post(path, json=body)
    latency = time.perf_counter() - t0
    r.raise_for_status()
    if "x-erllama-cache" in r.headers:
        h = parse_header(r.headers["x-erllama-cache"])
        return latency, int(h["restored"]), int(h["prompt"])
    data = r.json()
    timings = data.get("timings") or {}
    if "cache_n" in timings:
        return latency, int(timings["cache_n"]), int(timings["cache_n"]) + int(timings.get("prompt_n", 0))
    usage = data.get("usage") or {}
    if "cache_read_input_tokens" in usage:
        read = int(usage["cache_read_input_tokens"] or 0)
        return latency, read, read + int(usage.get("input_tokens", 0))
    return latency, None, None


def complete(prompt: str) -> dict[str, Any]:
    return {"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0}


class Text:
    """Prompts of a given length in SmolLM2 tokens."""

    def __init__(self, vocab: Model) -> None:
        self.vocab = vocab

    def n(self, text: str) -> int:
        return len(self.vocab.tokenize(text, add_special=False))

    def of(self, n_tokens: int, seed: int) -> str:
        """About ``n_tokens`` tokens of text, different for each seed (from its first word on)."""
        text = f"Record {seed}: " + words(max(1, int(n_tokens * 0.9)), seed)
        toks = self.vocab.tokenize(text, add_special=False)
        while len(toks) < n_tokens:
            text += " " + words(n_tokens - len(toks), seed + 7919)
            toks = self.vocab.tokenize(text, add_special=False)
        return self.vocab.detokenize(toks[:n_tokens])


@contextlib.contextmanager
def trio(
    path: str, args: argparse.Namespace, ctx: int, erllama_extra: Sequence[str] = ()
) -> Iterator[dict[str, httpx.Client]]:
    """erllama, erllama --no-cache and llama-server, up together; a client for each."""
    with contextlib.ExitStack() as stack:
        up = {
            "erllama": serving("erllama", path, args.threads, args.slots, ctx, extra=list(erllama_extra)),
            "no-cache": serving("erllama", path, args.threads, args.slots, ctx, extra=["--no-cache"]),
            "llama-server": serving("llama-server", path, args.threads, args.slots, ctx, extra=[]),
        }
        clients = {}
        for name, cm in up.items():
            srv = stack.enter_context(cm)
            clients[name] = stack.enter_context(httpx.Client(base_url=srv.base, timeout=900))
        yield clients


def p99(xs: Sequence[float]) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


# -- workloads -----------------------------------------------------------------------------------------------------


def dual(path: str, args: argparse.Namespace, text: Text) -> None:
    prefix = text.of(512, 1)
    turns = 6
    growth = {s: [text.of(64, 100 * s + t) for t in range(turns)] for s in (2, 3)}
    ms: dict[str, list[float]] = {}
    with trio(path, args, 2048) as servers:
        for name, c in servers.items():
            out = []
            for t in range(turns):
                for s in (2, 3):
                    prompt = prefix + "".join(f"\n[session {s}, turn {i}] {growth[s][i]}" for i in range(t + 1))
                    latency, _, _ = send(c, "/v1/completions", complete(prompt))
                    if t > 0:
                        out.append(latency)
            ms[name] = out
            print(f"  dual {name:12s} mean TTFT after the first pair {1e3 * statistics.mean(out):7.1f} ms", flush=True)
    ratio = statistics.mean(ms["erllama"]) / statistics.mean(ms["no-cache"])
    peer = statistics.mean(ms["erllama"]) / statistics.mean(ms["llama-server"])
    gate(
        "dual-agent TTFT vs no-cache", f"{ratio:.3f}x (vs llama-server with its host cache: {peer:.3f}x)", ratio <= 0.3
    )


def unique(path: str, args: argparse.Namespace, text: Text) -> None:
    n, repeats = 6, 3
    ms: dict[str, list[float]] = {"erllama": [], "no-cache": []}
    with contextlib.ExitStack() as stack:
        clients = {
            k: stack.enter_context(httpx.Client(base_url=stack.enter_context(
                serving("erllama", path, args.threads, args.slots, 1024, extra=extra)).base, timeout=900))
            for k, extra in (("erllama", []), ("no-cache", ["--no-cache"]))
        }  # fmt: skip
        for rep in range(repeats):
            for name in ("erllama", "no-cache") if rep % 2 == 0 else ("no-cache", "erllama"):
                for i in range(n):
                    latency, restored, _ = send(
                        clients[name],
                        "/v1/completions",
                        complete(text.of(384, 1000 * rep + 10 * i + (name == "erllama"))),
                    )
                    assert not restored, "a unique prompt restored something"
                    ms[name].append(latency)
    for name, xs in ms.items():
        print(f"  unique {name:10s} median TTFT {1e3 * statistics.median(xs):7.1f} ms over {len(xs)}", flush=True)
    ratio = statistics.median(ms["erllama"]) / statistics.median(ms["no-cache"])
    gate("unique prompts TTFT vs no-cache", f"{ratio:.3f}x", ratio <= 1.03)


def shared(path: str, args: argparse.Namespace, text: Text) -> None:
    groups = [text.of(1024, 5000 + g) for g in range(4)]
    prompts = [
        f"{groups[g]}\nQuestion {q}: {text.of(16, 6000 + 10 * g + q)}\nAnswer:" for q in range(8) for g in range(4)
    ]
    rates: dict[str, float] = {}
    with trio(path, args, 1536) as servers:
        for name, c in servers.items():

            async def go(base: str) -> float:
                sem = asyncio.Semaphore(args.slots)
                async with httpx.AsyncClient(base_url=base, timeout=900) as ac:

                    async def one(p: str) -> None:
                        async with sem:
                            (await ac.post("/v1/completions", json=complete(p))).raise_for_status()

                    t0 = time.perf_counter()
                    await asyncio.gather(*(one(p) for p in prompts))
                    return len(prompts) / (time.perf_counter() - t0)

            rates[name] = asyncio.run(go(str(c.base_url)))
            print(f"  shared {name:12s} {rates[name]:6.2f} requests/s", flush=True)
    ratio = rates["erllama"] / rates["no-cache"]
    peer = rates["erllama"] / rates["llama-server"]
    gate("shared prefix requests/s vs no-cache", f"{ratio:.2f}x (vs llama-server: {peer:.2f}x)", ratio >= 2.0)


def qa(path: str, args: argparse.Namespace, text: Text) -> None:
    system = text.of(512, 7000)
    users = 4
    history = [text.of(1024, 7100 + u) for u in range(users)]
    rounds = 5
    kv = tempfile.mkdtemp(prefix="erllama-bench-qa-")
    extra = ["--ram-cache-mb", str(args.qa_ram_mb), "--disk-cache-mb", "4096", "--kv-dir", kv]
    ms: dict[str, list[float]] = {}
    tiers: dict[str, int] = {}
    with trio(path, args, 4096, extra) as servers:
        for name, c in servers.items():
            if name == "no-cache":
                continue
            out, convo = [], {u: f"{system}\n\nUser {u} history:\n{history[u]}" for u in range(users)}
            for r in range(rounds):
                for u in range(users):
                    convo[u] += f"\nQ{r}: {text.of(32, 7200 + 10 * u + r)}\nA{r}:"
                    t0 = time.perf_counter()
                    resp = c.post("/v1/completions", json=complete(convo[u]))
                    out.append(time.perf_counter() - t0)
                    resp.raise_for_status()
                    if "x-erllama-cache" in resp.headers:
                        tier = parse_header(resp.headers["x-erllama-cache"]).get("tier", "cold")
                        tiers[tier] = tiers.get(tier, 0) + 1
                    convo[u] += " " + text.of(32, 7300 + 10 * u + r)  # the recorded answer
            ms[name] = out
            print(
                f"  qa {name:12s} mean TTFT {1e3 * statistics.mean(out):7.1f} ms, p99 {1e3 * p99(out):7.1f} ms",
                flush=True,
            )
    print(f"  qa erllama hits by tier: {tiers}")
    mean = statistics.mean(ms["erllama"]) / statistics.mean(ms["llama-server"])
    tail = p99(ms["erllama"]) / p99(ms["llama-server"])
    gate("multi-round QA vs llama-server (mean, p99)", f"{mean:.3f}x, {tail:.3f}x (disk served {tiers.get('disk', 0)})",
         mean <= 1.0 and tiers.get("disk", 0) > 0)  # fmt: skip


@contextlib.contextmanager
def erllama_at(path: str, args: argparse.Namespace, port: int, kv: str) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "erllama", "serve", "--model", path, "--name", "m", "--port", str(port),
           "--threads", str(args.threads), "--parallel", str(args.slots), "--ctx", "3072", "--flash-attn", "off",
           "--ram-cache-mb", "4096", "--disk-cache-mb", "4096", "--kv-dir", kv, "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, timeout_s=180, what="erllama serve")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def _settled(c: httpx.Client) -> None:
    seen, deadline = -1, time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = c.get("/erllama/v1/cache/stats").json()["rows"]
        if rows == seen:
            return
        seen = rows
        time.sleep(0.5)


def restart(path: str, args: argparse.Namespace, text: Text, repeats: int = 5) -> None:
    """``repeats`` rounds of: the next turn of the conversation served warm (a RAM hit), ``kill -9``, a restart,
    the next turn again as the first request (the disk tier's row); medians compared."""
    convo = text.of(2000, 8000)

    def turn(i: int) -> str:
        return f"{convo}\nQuestion {i}: {text.of(24, 8001 + i)}\nAnswer:"

    kv = tempfile.mkdtemp(prefix="erllama-bench-restart-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    warm: list[float] = []
    after: list[float] = []
    tiers: list[str | None] = []
    for rep in range(repeats):
        with erllama_at(path, args, port, kv) as proc, httpx.Client(base_url=base, timeout=900) as c:
            if rep == 0:
                cold, _, _ = send(c, "/v1/completions", complete(convo))
                print(f"  restart erllama: cold {1e3 * cold:.1f} ms")
            else:  # the first request after the restart: served by the disk tier
                t1 = time.perf_counter()
                first = c.post("/v1/completions", json=complete(turn(2 * rep)))
                after.append(time.perf_counter() - t1)
                first.raise_for_status()
                header = parse_header(first.headers["x-erllama-cache"])
                tiers.append(header.get("tier"))
                print(f"  restart erllama: first request after restart {1e3 * after[-1]:.1f} ms "
                      f"({header['restored']} restored from {tiers[-1]})")  # fmt: skip
            _settled(c)
            latency, restored, _ = send(c, "/v1/completions", complete(turn(2 * rep + 1)))
            warm.append(latency)
            print(f"  restart erllama: warm RAM hit {1e3 * latency:.1f} ms ({restored} restored)")
            _settled(c)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    with erllama_at(path, args, port, kv), httpx.Client(base_url=base, timeout=900) as c:
        t1 = time.perf_counter()
        first = c.post("/v1/completions", json=complete(turn(2 * repeats)))
        after.append(time.perf_counter() - t1)
        first.raise_for_status()
        tiers.append(parse_header(first.headers["x-erllama-cache"]).get("tier"))
        print(f"  restart erllama: first request after restart {1e3 * after[-1]:.1f} ms (from {tiers[-1]})")
    # a llama-server that restarts starts empty (its slots and host cache are process memory): its first request
    srv_cm = serving("llama-server", path, args.threads, args.slots, 3072, extra=[])
    with srv_cm as srv, httpx.Client(base_url=srv.base, timeout=900) as c:
        peer_after, peer_restored, _ = send(c, "/v1/completions", complete(turn(0)))
    print(f"  restart llama-server: first request after a restart {1e3 * peer_after:.1f} ms ({peer_restored} restored)")
    ratio = statistics.median(after) / statistics.median(warm)
    measured = (f"{ratio:.3f}x (medians of {len(after)} restarts: {1e3 * statistics.median(after):.0f} vs "
                f"{1e3 * statistics.median(warm):.0f} ms; served from {sorted(set(map(str, tiers)))}; "
                f"llama-server after its restart: {peer_after / statistics.median(warm):.1f}x)")  # fmt: skip
    gate("restart first request vs warm RAM hit", measured, ratio <= 1.2)


class _Host:
    """The model's vocabulary and template as prompt_tokens wants a runtime (no weights loaded)."""

    def __init__(self, vocab: VocabModel) -> None:
        self.vocab = vocab

    def model_info(self, model_id: str) -> dict[str, Any]:
        return self.vocab.model_info(model_id)

    def apply_chat_template(self, model_id: str, messages: Any, *, add_generation_prompt: bool = True) -> str:
        return self.vocab.apply_chat_template(model_id, messages, add_generation_prompt=add_generation_prompt)

    def tokenize(self, model_id: str, text: str, *, parse_special: bool = True) -> list[int]:
        return self.vocab.tokenize(text)


def _session(
    c: httpx.Client, host: _Host, dialect: str, bodies: list[dict[str, Any]], settle: bool
) -> tuple[float, float]:
    """(restored share, ceiling share) over requests 2.., and print per request."""
    prompts = [prompt_tokens(host, "m", dialect, b) for b in bodies]
    restored_sum = ceiling_sum = total = 0
    for t, body in enumerate(bodies):
        _, restored, n = send(c, PATHS[dialect], body)
        if settle:  # an agent runs its tools between turns: the reply's row is written by the next request
            _settled(c)
        if t:
            restored_sum += restored or 0
            ceiling_sum += ceiling(prompts, t)
            total += n or len(prompts[t])
    return restored_sum / total, ceiling_sum / total


def agents(path: str, args: argparse.Namespace, text: Text) -> None:
    host = _Host(VocabModel(path))
    with contextlib.ExitStack() as stack:
        erl = stack.enter_context(serving("erllama", path, args.threads, args.slots, 6144, extra=[]))
        c = stack.enter_context(httpx.Client(base_url=erl.base, timeout=900))
        for dialect, seed in (("openai", 51), ("anthropic", 52), ("ollama", 53)):
            one = {"max_tokens": 1} if dialect != "ollama" else {"options": {"num_predict": 1, "temperature": 0}}
            bodies = [b | one for b in tool_loop(dialect, 12, model="m", system_words=300, seed=seed)]
            share, top = _session(c, host, dialect, bodies, settle=True)
            print(f"  agents {dialect:9s} 12-turn tool loop: restored {100 * share:.1f}% of turns 2..12 "
                  f"(ceiling {100 * top:.1f}%)")  # fmt: skip
            gate(f"tool loop ({dialect}) restores its ceiling", f"{100 * share:.1f}% of {100 * top:.1f}%", share >= top)
        session = [
            dict(b, max_tokens=1) for b in claude_code_session(4, model="m", system_words=2800, result_words=6, seed=61)
        ]
        share, top = _session(c, host, "anthropic", session, settle=True)
        print(f"  agents Claude-Code-shaped: restored {100 * share:.1f}% of turns 2..4 (ceiling {100 * top:.1f}%)")
        gate("Claude-Code-shaped session", f"{100 * share:.1f}% restored", share >= 0.95)
    with (
        serving("llama-server", path, args.threads, args.slots, 6144, extra=[]) as srv,
        httpx.Client(base_url=srv.base, timeout=900) as c,
    ):
        peer_session = [
            dict(b, max_tokens=1) for b in claude_code_session(3, model="m", system_words=2800, result_words=6, seed=62)
        ]
        share, _ = _session(c, host, "anthropic", peer_session, settle=False)
        print(f"  agents Claude-Code-shaped on llama-server: restored {100 * share:.1f}% of turns 2..3 "
              "(llama.cpp#21793 masks the header's cch; its cc_version suffix changes every request too)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ALL), help="comma-separated workloads (default: all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--qa-ram-mb", type=int, default=48, help="erllama's RAM tier in the QA workload")
    args = ap.parse_args()
    path = str(fetch())
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs; {args.threads} threads, {args.slots} slots; {Path(path).name}"
    )
    with Model(path, ModelConfig(vocab_only=True)) as vocab:
        text = Text(vocab)
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            {"dual": dual, "unique": unique, "shared": shared, "qa": qa, "restart": restart, "agents": agents}[name](
                path, args, text
            )
    print("\ngates:")
    for name, measured, passed in GATES:
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {measured}")


if __name__ == "__main__":
    main()
