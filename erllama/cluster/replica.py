"""``ModelReplica``: one erllama runtime and its HTTP app inside a Ray Serve replica.

The replica is ``erllama serve`` without the socket: the same :func:`~erllama.server.create_app` over one
:class:`~erllama.runtime.Runtime`, fed the requests the ingress forwards (:mod:`erllama.cluster.bridge`). It
reports a :class:`~erllama.cache.index.RouteSummary` of its cache to the router through Ray's routing stats, and
says who it is in every response (``x-erllama-replica``). Ray restarts it when it dies; its rows on the disk tier
outlive it (they are files, published by rename), and with a shared tier its successor and its peers restore them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from erllama.cluster.bridge import Forwarded, Lifespan, ResponseStart, run_request
from erllama.cluster.config import ClusterConfig
from erllama.cluster.placement import Route
from erllama.errors import WorkerStoppedError

__all__ = ["REPLICA_HEADER", "ModelReplica", "resolve_model"]

REPLICA_HEADER = "x-erllama-replica"
log = logging.getLogger("erllama.cluster")


def resolve_model(spec: str) -> tuple[str, Path]:
    """The model's name and file on this node (a path as given, else the store's copy, pulled when missing)."""
    import io

    from erllama.cli.local import model_file
    from erllama.cli.output import Output
    from erllama.store.store import ModelStore

    quiet = Output(as_json=True, stdout=io.StringIO(), stderr=io.StringIO())
    return model_file(spec, ModelStore(env=os.environ), quiet)


def kv_root(config: ClusterConfig, replica: str) -> Path:
    base = Path(config.kv_dir) if config.kv_dir else _cache_dir() / "kv-cluster"
    return base if config.shared_kv else base / replica


def _cache_dir() -> Path:
    return Path(os.environ.get("ERLLAMA_CACHE_DIR") or Path.home() / ".cache" / "erllama")


class ModelReplica:
    """The body of the model deployment (see :func:`erllama.cluster.app.build`)."""

    def __init__(self, config: ClusterConfig, replica_name: str | None = None) -> None:
        from erllama._native import ContextConfig, ModelConfig
        from erllama.cache import CacheStore, FileTier, RamTier
        from erllama.cache.tier import Tier
        from erllama.model import LlamaBackend
        from erllama.runtime import Runtime
        from erllama.server import ServerConfig, create_app

        self.name = replica_name or _replica_name()
        self.config = config
        name, path = resolve_model(config.model)
        given_path = config.model.endswith(".gguf") or os.sep in config.model
        self.served = config.name or (name if given_path else config.model)
        tiers: list[Tier] = [RamTier(config.ram_cache_mb << 20)]
        if config.disk_cache_mb > 0:
            tiers.append(FileTier([kv_root(config, self.name)], config.disk_cache_mb << 20, shared=True))
        self.cache = CacheStore(tiers)
        ctx = ContextConfig(
            n_ctx=config.ctx * config.parallel,
            n_batch=config.batch,
            n_seq_max=config.parallel,
            n_threads=config.threads,
            n_threads_batch=config.threads,
        )
        model_cfg = ModelConfig(n_gpu_layers=config.gpu_layers)
        self.runtime = Runtime(self.cache)
        self.model_id = self.runtime.load_model(
            backend=lambda: LlamaBackend(path, model_cfg, ctx), model_id=self.served
        )
        server = ServerConfig(keep_alive_s=None, max_queue=1 << 16, queue_timeout_s=600.0)
        self.app = create_app(self.runtime, {self.served: self.model_id}, server, on_shutdown=self._close_runtime)
        self._lifespan = Lifespan(self.app)
        self._started: asyncio.Task[None] | None = None
        self._header = ((REPLICA_HEADER.encode(), self.name.encode()),)
        log.info("replica %s: serving %s (pid %d)", self.name, self.served, os.getpid())

    async def forward(self, request: Forwarded, route: Route | None = None) -> AsyncIterator[ResponseStart | bytes]:
        """Run one HTTP request through this replica's app (``route`` is the router's; unused here)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._lifespan.start())
        await asyncio.shield(self._started)
        async for part in run_request(self.app, request, extra_headers=self._header):
            yield part

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the router reads (Ray calls this every ``stats_period_s``)."""
        summary = await asyncio.to_thread(self.cache.summary)
        namespace = self.runtime.cache_namespace(self.model_id)
        roots = summary.roots | ({namespace.digest()} if namespace is not None else set())
        return {
            "summary": dataclasses.replace(summary, roots=frozenset(roots)),
            "name": self.name,
            "pid": os.getpid(),
        }

    def check_health(self) -> None:
        """Ray's health check: the model's worker must be running."""
        status = self.runtime.status(self.model_id)
        if status != "running":
            raise WorkerStoppedError(f"model {self.model_id} is {status}")

    def _close_runtime(self) -> None:
        self.runtime.close()
        self.cache.close()

    async def __del__(self) -> None:  # Ray Serve's graceful shutdown: shutdown saves, the writer drained
        if self._started is None:
            await asyncio.to_thread(self._close_runtime)
        else:
            await self._lifespan.stop()


def _replica_name() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside a replica (tests): this process
        return f"pid-{os.getpid()}"
