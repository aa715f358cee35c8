"""Stateless multi-turn chat through the daemon, in each dialect: the client resends the whole conversation every
turn (as chat UIs and agents do), and from turn 2 the earlier turns come from the cache.

For each of OpenAI (``/v1/chat/completions``), Anthropic (``/v1/messages``) and Ollama (``/api/chat``): a
conversation with a ~``--system-tokens`` system prompt runs ``--turns`` turns, streamed; TTFT is the first text
chunk at the client. Then the last turn's whole conversation is sent again with one character changed at the start
of the system prompt — the same length, nothing to reuse — as the cold control. Printed: TTFT per turn, the cached
tokens the dialect reports, and last warm turn / cold control.

    python -m bench.bench_multiturn [--turns 4] [--system-tokens 600] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import httpx

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.cache import CacheStore, RamTier
from erllama.model import LlamaBackend
from erllama.server import create_app
from erllama.testing import fetch, serve_app

Send = Callable[[httpx.Client, list[dict[str, str]]], tuple[float, str, int]]


def _sse(resp: httpx.Response) -> Any:
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def openai_turn(c: httpx.Client, messages: list[dict[str, str]]) -> tuple[float, str, int]:
    body = {
        "model": "m",
        "messages": messages,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0, first, text, cached = time.perf_counter(), 0.0, "", 0
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        for chunk in _sse(r):
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            for choice in chunk.get("choices") or []:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    text += choice["delta"]["content"]
    return first, text, cached


def anthropic_turn(c: httpx.Client, messages: list[dict[str, str]]) -> tuple[float, str, int]:
    body = {"model": "m", "system": messages[0]["content"], "messages": messages[1:], "max_tokens": 24, "stream": True}
    t0, first, text, cached = time.perf_counter(), 0.0, "", 0
    with c.stream("POST", "/v1/messages", json=body) as r:
        for event in _sse(r):
            if event["type"] == "content_block_delta" and event["delta"].get("text"):
                first = first or time.perf_counter() - t0
                text += event["delta"]["text"]
            elif event["type"] == "message_delta":
                cached = event["usage"]["cache_read_input_tokens"]
    return first, text, cached


def ollama_turn(c: httpx.Client, messages: list[dict[str, str]]) -> tuple[float, str, int]:
    body = {"model": "m", "messages": messages, "options": {"temperature": 0, "num_predict": 24}}
    t0, first, text, cached = time.perf_counter(), 0.0, "", 0
    with c.stream("POST", "/api/chat", json=body) as r:
        for line in r.iter_lines():
            chunk = json.loads(line)
            if chunk["message"].get("content"):
                first = first or time.perf_counter() - t0
                text += chunk["message"]["content"]
            if chunk.get("done"):
                cached = chunk["prompt_eval_cached_count"]
    return first, text, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=600)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    path = fetch()
    rt = Runtime(CacheStore([RamTier(4 << 30)]))
    cfg = ContextConfig(n_ctx=2 * 4096, n_batch=512, n_seq_max=2, n_threads=args.threads, n_threads_batch=args.threads)
    model = rt.load_model(backend=lambda: LlamaBackend(path, context_config=cfg), model_id="m")
    print(
        f"machine: {os.cpu_count()} CPUs, {args.threads} threads; {path.name}; "
        f"system prompt ~{args.system_tokens} tokens"
    )
    with serve_app(create_app(rt, {"m": model})) as base:
        _dialects(base, args)
    rt.close()


def _dialects(base: str, args: argparse.Namespace) -> None:
    system = "You are a patient geography tutor who answers in one short sentence. " * (args.system_tokens // 13)
    questions = [
        "Name a country in Europe.",
        "And its capital?",
        "Name a river there.",
        "Another country?",
        "Its capital?",
    ]
    dialects: list[tuple[str, Send]] = [("openai", openai_turn), ("anthropic", anthropic_turn), ("ollama", ollama_turn)]
    with httpx.Client(base_url=base, timeout=600) as c:
        for name, send in dialects:
            messages = [{"role": "system", "content": f"[{name}] {system}"}]
            ttfts = []
            for turn in range(args.turns):
                messages.append({"role": "user", "content": questions[turn % len(questions)]})
                ttft, reply, cached = send(c, messages)
                ttfts.append(ttft)
                shown = f"cached {cached:5d}" if cached >= 0 else f"evaluated {-cached:5d}"
                print(f"  {name:9s} turn {turn + 1}: TTFT {ttft * 1e3:8.1f} ms   {shown}")
                messages.append({"role": "assistant", "content": reply})
            control = [{"role": "system", "content": f"[{name.upper()}] {system}"}, *messages[1:-1]]
            cold, _, _ = send(c, control)
            print(f"  {name:9s} cold control (turn {args.turns}'s conversation, nothing cached): {cold * 1e3:8.1f} ms")
            print(f"  {name:9s} turn {args.turns} warm / cold = {ttfts[-1] / cold:.3f}x")


if __name__ == "__main__":
    main()
