"""``erllama cluster serve``: deploy a model's replicas on Ray Serve (a running cluster, or one started here) and
serve them until interrupted."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Mapping

from erllama.cli.output import Output
from erllama.errors import InvalidInputError

__all__ = ["cluster_serve"]


def cluster_serve(args: argparse.Namespace, env: Mapping[str, str], out: Output) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise InvalidInputError("erllama cluster needs Ray Serve: pip install 'erllama[cluster]'") from exc
    from erllama.cluster import ClusterConfig, build

    config = ClusterConfig(
        model=args.model,
        name=args.name,
        replicas=args.replicas,
        autoscale=tuple(args.autoscale) if args.autoscale else None,
        threads=args.threads,
        replica_cpus=args.replica_cpus,
        gpu_layers=args.gpu_layers,
        replica_gpus=args.replica_gpus,
        ctx=args.ctx,
        parallel=args.parallel,
        ram_cache_mb=args.ram_cache_mb,
        disk_cache_mb=args.disk_cache_mb,
        kv_dir=args.kv_dir,
        shared_kv=not args.private_kv,
        router=args.router,
    )
    ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(config), name="erllama", route_prefix="/")
    out.note(f"erllama cluster serving {config.name or config.model} on http://{args.host}:{args.port}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    out.note("stopping: the replicas save their live sequences")
    serve.delete("erllama")
    ray.shutdown()
    return 0
