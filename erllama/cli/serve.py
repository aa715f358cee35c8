"""``erllama serve``: the HTTP daemon (OpenAI, Anthropic and Ollama dialects) over the model store."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from erllama.cli.local import default_kv_dir, model_file
from erllama.cli.output import Output

__all__ = ["serve"]


def serve(args: argparse.Namespace, env: Mapping[str, str], out: Output) -> int:
    import gc

    import uvicorn

    from erllama._native import ContextConfig, FlashAttention
    from erllama.cache import CacheStore, FileTier, RamTier
    from erllama.cache.tier import Tier
    from erllama.model import LlamaBackend
    from erllama.runtime import Runtime
    from erllama.server import ServerConfig, StoreSource, create_app
    from erllama.server.models import ModelDirectory
    from erllama.server.state import ModelSource
    from erllama.store.store import ModelStore

    kv_dir = Path(args.kv_dir) if args.kv_dir else default_kv_dir(env)
    tiers: list[Tier] = [RamTier(args.ram_cache_mb << 20)]
    if args.disk_cache_mb > 0:
        tiers.append(FileTier([kv_dir], args.disk_cache_mb << 20))
    cache = CacheStore(tiers) if not args.no_cache else None
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
        api_key=args.api_key or env.get("ERLLAMA_API_KEY"),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout,
        keep_alive_s=None if args.keep_alive < 0 else args.keep_alive,
        cors_origins=tuple(args.cors_origin or ()),
    )
    store = ModelStore(env=env)
    source: ModelSource = ModelDirectory(Path(args.models_dir), load) if args.models_dir else StoreSource(store, load)
    with Runtime(cache) as rt:
        served: dict[str, str] = {}
        if args.model:  # a GGUF file, or a model of the store, loaded now and kept
            name, path = model_file(args.model, store, out)
            served[args.name or name] = load(rt, path, args.name or name)
        app = create_app(rt, served, config, source=source)
        # What is alive now (the libraries, the app, the loaded models) lives as long as the process: out of the
        # cyclic collector's sight, collections walk only what requests allocate. Unfrozen, a full collection took
        # 9-12 ms here, holding the GIL while a model worker waited for it; frozen, an 8-stream run saw none.
        gc.collect()
        gc.freeze()
        out.note(f"erllama serving on http://{args.host}:{args.port} (models: {', '.join(served) or 'on demand'})")
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    if cache is not None:
        cache.close()
    return 0
