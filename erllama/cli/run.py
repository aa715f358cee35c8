"""``erllama run MODEL [PROMPT]``: stream a chat reply, through a running daemon or in this process.

With a daemon at the CLI's address the request goes to it (``/api/chat``), so its loaded model and warm cache
serve it. Without one (or with ``--local``) the model is loaded here from the store (pulled first if it is a
catalog name that is not installed), with a RAM tier and a disk tier under ``$ERLLAMA_CACHE_DIR/kv``: the next
``run`` of the same prompt, in another process, restores it from disk. The prompt comes from the arguments, else
from stdin; on a terminal with no prompt it is an interactive chat, each turn resending the conversation so far
(which the cache serves warm).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from erllama.cli.client import Daemon
from erllama.cli.local import default_kv_dir, in_catalog, model_file
from erllama.cli.output import Output
from erllama.errors import UnknownModelError
from erllama.store.store import ModelStore

__all__ = ["run"]


class _Local:
    """A model loaded in this process, with a RAM + disk KV-state cache."""

    def __init__(self, path: Path, args: argparse.Namespace, env: Mapping[str, str]) -> None:
        from erllama._native import ContextConfig
        from erllama.cache import CacheStore, FileTier, RamTier
        from erllama.chat import ChatEngine
        from erllama.model import LlamaBackend
        from erllama.runtime import Runtime

        kv_dir = Path(args.kv_dir) if args.kv_dir else default_kv_dir(env)
        self.cache = CacheStore([RamTier(1 << 30), FileTier([kv_dir], 4 << 30)])
        self.rt = Runtime(self.cache)
        cfg = ContextConfig(n_ctx=args.ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads)
        self.model = self.rt.load_model(backend=lambda: LlamaBackend(path, context_config=cfg))
        self.min_tokens = self.rt.policy.min_tokens
        self.chat = ChatEngine(self.rt)  # the model's own Jinja template, rendered as the daemon renders it

    def turn(self, messages: list[dict[str, str]], args: argparse.Namespace, write: Callable[[str], None]) -> Any:
        from erllama.chat import Message
        from erllama.chat.types import Role
        from erllama.runtime import TextDelta

        if args.raw:
            prompt = messages[-1]["content"]
        else:
            convo = [Message(role=cast(Role, m["role"]), content=m["content"]) for m in messages]
            prompt = self.chat.prepare(self.model, convo).prompt
        stream = self.rt.infer(
            self.model, prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
        )
        for event in stream:
            if isinstance(event, TextDelta):
                write(event.text)
        done = stream.result()
        self.cache.drain()  # the rows are on disk before the process may exit
        s = done.stats
        report = done.cache
        why = {}
        if report is not None and report.restored_tokens < report.ceiling:
            why = {"why": report.explain(lambda ids: self.rt.detokenize(self.model, ids))}
        return done.reply, {
            "cache": done.cache_hit_kind,
            "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.restored_tokens,
            "completion_tokens": s.generated_tokens,
            "ttft_ms": round(s.ttft_s * 1e3, 1),
            "tokens_per_s": round(s.tokens_per_s, 1),
            **({"not_cached": f"prompts under {self.min_tokens} tokens are cheaper to prefill than to restore"}
               if s.prompt_tokens < self.min_tokens else {}),
            **why,
        }  # fmt: skip

    def close(self) -> None:
        self.rt.close()
        self.cache.close()


class _Remote:
    """The daemon's copy of the model."""

    def __init__(self, daemon: Daemon, model: str, out: Output) -> None:
        self.daemon = daemon
        self.model = model
        self.out = out

    def turn(self, messages: list[dict[str, str]], args: argparse.Namespace, write: Callable[[str], None]) -> Any:
        options: dict[str, Any] = {"num_predict": args.max_tokens, "temperature": args.temperature}
        if args.seed is not None:
            options["seed"] = args.seed
        start = time.monotonic()
        first: float | None = None
        reply: list[str] = []
        final: dict[str, Any] = {}
        try:
            records = self.daemon.chat(self.model, messages, options, explain=bool(getattr(args, "verbose", False)))
            head = next(records, None)
        except UnknownModelError:
            if not in_catalog(self.model):
                raise
            for step in self.daemon.pull(self.model):  # as `ollama run` does: the daemon fetches it, then answers
                if "completed" not in step:
                    self.out.note(str(step.get("status", "")))
            records = self.daemon.chat(self.model, messages, options, explain=bool(getattr(args, "verbose", False)))
            head = next(records, None)
        for record in itertools.chain([head] if head is not None else [], records):  # streamed as they arrive
            text = record.get("message", {}).get("content", "")
            if text:
                first = first if first is not None else time.monotonic()
                reply.append(text)
                write(text)
            if record.get("done"):
                final = record
        n_eval = int(final.get("eval_count", 0))
        eval_s = float(final.get("eval_duration", 0)) / 1e9
        cache = final.get("cache") or {}  # erllama's daemon says how its cache served the prompt
        return "".join(reply), {
            "cache": str(cache.get("hit", "daemon")),
            "prompt_tokens": int(cache.get("prompt_tokens", final.get("prompt_eval_count", 0))),
            **({"cached_tokens": int(cache["cached_tokens"])} if "cached_tokens" in cache else {}),
            "completion_tokens": n_eval,
            "ttft_ms": round(((first or time.monotonic()) - start) * 1e3, 1),
            "tokens_per_s": round((n_eval - 1) / eval_s, 1) if n_eval > 1 and eval_s else 0.0,
            **({"why": str(cache["reason"])} if cache.get("reason") else {}),
        }

    def close(self) -> None:
        self.daemon.close()


def _stats_line(stats: Mapping[str, Any]) -> str:
    cached = f", {stats['cached_tokens']} cached" if "cached_tokens" in stats else ""
    if "not_cached" in stats:
        cached += f" (not cached: {stats['not_cached']})"
    line = (
        f"[cache {stats['cache']}: prompt {stats['prompt_tokens']} tokens{cached}; first token after "
        f"{stats['ttft_ms']:.1f} ms; {stats['completion_tokens']} tokens at {stats['tokens_per_s']:.1f} tokens/s]"
    )
    return f"{line}\n[{stats['why']}]" if "why" in stats else line


def _prompts(args: argparse.Namespace, stdin: Any) -> Iterator[str]:
    if args.prompt:
        yield " ".join(args.prompt)
        return
    if not stdin.isatty():
        text = stdin.read().strip()
        if text:
            yield text
        return
    while True:  # interactive chat
        try:
            line = input(">>> ")
        except EOFError:
            return
        if line.strip() in ("/bye", "/exit", "/quit"):
            return
        if line.strip():
            yield line


def run(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    backend: _Local | _Remote
    if not args.local and daemon.up():
        backend = _Remote(daemon, args.model, out)
    else:
        name, path = model_file(args.model, ModelStore(env=env), out)
        if args.verbose:
            out.note(f"[loading {name} from {path}]")
        backend = _Local(path, args, env)
    messages: list[dict[str, str]] = []
    turns: list[dict[str, Any]] = []
    try:
        for prompt in _prompts(args, sys.stdin):
            messages.append({"role": "user", "content": prompt})
            reply, stats = backend.turn(messages, args, out.write)
            out.write("\n")
            messages.append({"role": "assistant", "content": reply})
            turns.append({"prompt": prompt, "reply": reply, "stats": stats})
            if args.verbose:
                out.note(_stats_line(stats))
    finally:
        backend.close()
    out.result({"model": args.model, "turns": turns})
    return 0
