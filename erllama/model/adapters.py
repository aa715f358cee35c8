"""``AdapterSync``: keeps a backend's LoRA adapters (and the cache namespace they are part of) in step with what the
runtime's adapter provider asks for, on the worker thread between two steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from erllama.model.backend import ModelBackend
from erllama.model.cachelink import CacheLink, SeqCache, namespace_for

__all__ = ["AdapterSync"]

AdapterSpecs = Callable[[], Sequence[tuple[str, str, float]]]
"""The provider: the adapters to apply now, ``(path, fingerprint, scale)`` each."""


class AdapterSync:
    """Loads, rescales and frees one backend's adapters to match ``specs()``."""

    def __init__(self, specs: AdapterSpecs, salt: str) -> None:
        self._specs = specs
        self._salt = salt
        self._handles: dict[str, object] = {}  # path -> the backend's handle

    def apply(self, backend: ModelBackend, link: CacheLink | None, running: Iterable[SeqCache]) -> None:
        """Match the provider; the link's namespace follows. The ``running`` sequences' KV now mixes two adapter
        settings: they are never restored or saved again."""
        specs = list(self._specs())
        handles = self._handles
        for path, _, _ in specs:
            if path not in handles:
                handles[path] = backend.load_adapter(path)
        backend.set_adapters([(handles[path], scale) for path, _, scale in specs])
        wanted = {path for path, _, _ in specs}
        for path in [p for p in handles if p not in wanted]:
            backend.free_adapter(handles.pop(path))
        if link is not None:
            link.namespace = namespace_for(backend.info, [(fp, scale) for _, fp, scale in specs], self._salt)
        for cache in running:
            cache.enabled = False
