"""``erllama serve``: the HTTP daemon (OpenAI, Anthropic and Ollama dialects) over the model store."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

from erllama.cli.local import default_kv_dir, model_file
from erllama.cli.output import Output

__all__ = ["serve"]

log = logging.getLogger("erllama.server")


def serve(args: argparse.Namespace, env: Mapping[str, str], out: Output) -> int:
    import gc

    import uvicorn

    from erllama._native import ContextConfig, FlashAttention
    from erllama.cache import CacheStore, FileTier, RamTier
    from erllama.cache.tier import Tier
    from erllama.chat.stable import StableOptions
    from erllama.model import LlamaBackend
    from erllama.runtime import Runtime
    from erllama.server import ServerConfig, StoreSource, create_app
    from erllama.server.http import protocol_with_header_deadline
    from erllama.server.models import ModelDirectory
    from erllama.server.state import ModelSource
    from erllama.store.store import ModelStore

    _log_to_stderr(args.log_level)
    kv_dir = Path(args.kv_dir) if args.kv_dir else default_kv_dir(env)
    tiers: list[Tier] = [RamTier(args.ram_cache_mb << 20)]
    if args.ram_file_cache_mb > 0:
        tiers.append(FileTier.ram_file(args.ram_file_cache_mb << 20, root=args.ram_file_dir))
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
        allowed_hosts=(*(args.allowed_host or ()), args.host),
        strict_max_tokens=args.strict_max_tokens,
        model_fallback=args.model_fallback,
        default_seed=None if args.seed is None or args.seed < 0 else args.seed,
        owned_by=args.owned_by,
        stable=StableOptions(
            strip_billing_header="billing-header" not in args.prompts_as_sent,
            order_tool_results="tool-results" not in args.prompts_as_sent,
            sort_tools="tools" not in args.prompts_as_sent,
        ),
    )
    store = ModelStore(env=env)
    source: ModelSource = ModelDirectory(Path(args.models_dir), load) if args.models_dir else StoreSource(store, load)
    with Runtime(cache) as rt:
        served: dict[str, str] = {}
        if args.model:  # a GGUF file, or a model of the store, loaded now and kept
            name, path = model_file(args.model, store, out)
            served[args.name or name] = load(rt, path, args.name or name)

        def shutdown() -> None:  # every orderly stop (SIGTERM, SIGINT, erllama stop): saves written, writer drained
            log.info("shutting down: saving live sequences and draining the cache writer")
            rt.close()
            if cache is not None:
                cache.close()

        app = create_app(rt, served, config, source=source, on_shutdown=shutdown)
        # What is alive now (the libraries, the app, the loaded models) lives as long as the process: out of the
        # cyclic collector's sight, collections walk only what requests allocate. Unfrozen, a full collection took
        # 9-12 ms here, holding the GIL while a model worker waited for it; frozen, an 8-stream run saw none.
        gc.collect()
        gc.freeze()
        out.note(f"erllama serving on http://{args.host}:{args.port} (models: {', '.join(served) or 'on demand'})")
        _exit_cleanly_on(signal.SIGTERM, signal.SIGINT)
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            http=protocol_with_header_deadline(args.header_timeout),
        )
    if cache is not None:
        cache.close()
    return 0


def _log_to_stderr(level: str) -> None:
    """erllama's own log lines (what the cache skipped, a request that failed, a worker that crashed) on stderr at
    the daemon's log level; llama.cpp's (``erllama.llama``) from warnings up unless debugging."""
    root = logging.getLogger("erllama")
    if any(getattr(h, "_erllama_serve", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._erllama_serve = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    llama = logging.DEBUG if root.level <= logging.DEBUG else max(logging.WARNING, root.level)
    logging.getLogger("erllama.llama").setLevel(llama)


def _exit_cleanly_on(*signals: signal.Signals) -> None:
    """After its graceful shutdown uvicorn restores the handlers it found and raises the signal it caught again; with
    Python's defaults that kills the process (SIGTERM: exit -15). Found instead, these handlers end the process
    with exit status 0 through ``SystemExit``, so the ``with`` blocks around the server close what they hold."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    for sig in signals:
        signal.signal(sig, stop)
