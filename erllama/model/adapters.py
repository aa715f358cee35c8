"""A model's LoRA adapters: :class:`AdapterSet`, what the runtime attached (by name, with scales), and
:class:`AdapterSync`, which keeps the backend's adapters (and the cache namespace they are part of) in step with it,
on the worker thread between two steps."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence

from erllama.errors import InvalidInputError
from erllama.model.backend import ModelBackend
from erllama.model.cachelink import CacheLink, SeqCache, namespace_for

__all__ = ["AdapterInfo", "AdapterSet", "AdapterSync"]

AdapterSpecs = Callable[[], Sequence[tuple[str, str, float]]]
"""The provider: the adapters to apply now, ``(path, fingerprint, scale)`` each."""


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    path: str
    scale: float


Undo = Callable[[], object]


class AdapterSet:
    """The adapters attached to one model, by name. Changes are made under :attr:`lock` and return how to undo them
    (the runtime undoes a change its worker could not apply)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._by_name: dict[str, AdapterInfo] = {}
        self._fingerprints: dict[str, str] = {}  # path -> file fingerprint (part of the cache namespace)

    def specs(self) -> list[tuple[str, str, float]]:
        """What the worker applies: ``(path, fingerprint, scale)`` of each adapter."""
        return [(a.path, self._fingerprints[a.path], a.scale) for a in list(self._by_name.values())]

    def list(self) -> list[AdapterInfo]:
        return list(self._by_name.values())

    def get(self, name: str) -> AdapterInfo:
        if name not in self._by_name:
            raise InvalidInputError(f"no adapter named {name!r}")
        return self._by_name[name]

    def add(self, info: AdapterInfo, fingerprint: str) -> Undo:
        if info.name in self._by_name:
            raise InvalidInputError(f"adapter {info.name!r} is already loaded")
        self._fingerprints[info.path] = fingerprint
        self._by_name[info.name] = info
        return lambda: self._by_name.pop(info.name)

    def set_scale(self, name: str, scale: float) -> Undo:
        old = self.get(name)
        self._by_name[name] = dataclasses.replace(old, scale=scale)
        return lambda: self._by_name.__setitem__(name, old)

    def remove(self, name: str) -> Undo:
        old = self.get(name)
        del self._by_name[name]
        return lambda: self._by_name.__setitem__(name, old)


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
