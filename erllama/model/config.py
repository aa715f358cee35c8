"""``WorkerConfig``: everything a model worker is started with besides its backend, as one value the runtime builds
once and the registry and supervisor pass down unchanged (to every worker a supervisor restarts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from erllama.cache import CacheStore, SavePolicy
from erllama.model.batching import BatchingConfig

__all__ = ["WorkerConfig"]


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker runs its model.

    Attributes:
        cache: where prompts are saved and restored (None: no cache).
        policy: when saves happen (the gates of :class:`~erllama.cache.SavePolicy`).
        salt: mixed into every cache key of this model (keeps apart what must not share rows).
        adapters: the LoRA adapters to apply, asked for at every tick: (path, fingerprint, scale) each.
        shutdown_save_timeout_s: how long a stopping worker waits for its shutdown saves.
        idle_wait_s: how long an idle worker sleeps between looks at its inbox (new requests wake it at once).
        batching: the batching rules' constants.
    """

    cache: CacheStore | None = None
    policy: SavePolicy = dataclasses.field(default_factory=SavePolicy)
    salt: str = ""
    adapters: Callable[[], Sequence[tuple[str, str, float]]] | None = None
    shutdown_save_timeout_s: float = 10.0
    idle_wait_s: float = 0.05
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
