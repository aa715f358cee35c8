"""``ClusterConfig``: what an erllama application on Ray Serve is made of (plain values, so a ``serve run`` /
``serve deploy`` config file can give them as the application's ``args``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from erllama.errors import InvalidInputError

__all__ = ["ClusterConfig"]


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One model served by ``replicas`` erllama replicas behind one ingress.

    Attributes:
        model: a GGUF path present on every node, or a model of the store (pulled on each node when missing).
        name: the name requests use for it (default: the model's name).
        replicas: model replicas (Ray places them); ``autoscale`` = (min, max) replicas instead, scaled by Ray on
            requests in flight per replica (``target_ongoing``).
        threads: CPU threads of each replica's llama context; ``replica_cpus`` the CPUs Ray reserves for one.
        ctx: context tokens per sequence; ``parallel`` sequences per replica; ``batch`` its n_batch.
        ram_cache_mb / disk_cache_mb: each replica's tier budgets.
        kv_dir: the disk tier's directory on every node (default ``$ERLLAMA_CACHE_DIR/kv-cluster``). With
            ``shared_kv`` (the default) every replica on a node uses it as one shared tier, and an NFS mount there
            makes it one tier for the whole cluster; without, each replica gets its own subdirectory.
        router: ``prefix`` (erllama's token-exact router) or ``default`` (Ray Serve's power of two choices).
        stats_period_s: how often replicas report their cache to the router.
        tokens_per_request / imbalance: the router's load terms (see :mod:`erllama.cluster.placement`).
        max_ongoing: requests Ray sends one replica at once (its own queue holds the rest).
        gpu_layers / replica_gpus: layers offloaded and GPUs Ray reserves per replica (0: CPU).
        max_replicas_per_node: at most this many replicas on one node (None: Ray decides).
    """

    model: str
    name: str | None = None
    replicas: int = 2
    autoscale: tuple[int, int] | None = None
    target_ongoing: float = 4.0
    threads: int = 1
    replica_cpus: float = 1.0
    ctx: int = 4096
    parallel: int = 4
    batch: int = 512
    ram_cache_mb: int = 2048
    disk_cache_mb: int = 8192
    kv_dir: str | None = None
    shared_kv: bool = True
    router: Literal["prefix", "default"] = "prefix"
    stats_period_s: float = 1.0
    tokens_per_request: int = 64
    imbalance: int = 8
    max_ongoing: int = 32
    gpu_layers: int = 0
    replica_gpus: float = 0.0
    max_replicas_per_node: int | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidInputError("a cluster needs at least one replica")
        if self.router not in ("prefix", "default"):
            raise InvalidInputError(f"router must be 'prefix' or 'default', not {self.router!r}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise InvalidInputError("autoscale is (min_replicas, max_replicas), 1 <= min <= max")

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ClusterConfig:
        """From a config file's ``args`` (unknown keys are an error, not silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise InvalidInputError(f"unknown cluster settings: {', '.join(unknown)}")
        values = dict(args)
        if values.get("autoscale") is not None:
            lo, hi = values["autoscale"]
            values["autoscale"] = (int(lo), int(hi))
        return cls(**values)
