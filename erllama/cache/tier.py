"""Cache tiers: where rows live, each behind one protocol, each with a byte budget enforced at publish time.

* :class:`RamTier` keeps rows in this process's memory.
* :class:`~erllama.cache.filetier.FileTier` keeps one KVC file per row under one or more directory roots:
  ``ram_file`` (a tmpfs such as ``/dev/shm``, shareable between processes) and ``disk`` are both file tiers.

Budgets and LRU live in :class:`Budget`, shared by both. Publishing a row first *reserves* its bytes (evicting
least-recently-used, unpinned rows until the reservation fits), then writes without holding the lock, then commits
or releases the reservation: the budget is never exceeded, not even transiently, and a row larger than the whole
budget is refused and counted. Rows being read are pinned so eviction cannot pull them away mid-load.

The life of a row (the reservation state machine; FileTier's I/O steps shown, RamTier just stores the bytes)::

    publish(row)
      │ reserve(size): evict LRU unpinned rows until used + reserved + size <= budget
      ├── larger than the budget, or nothing left to evict ──────────────▶ REFUSED (counted)
      ▼
    RESERVED ── write tmp/<key>.<pid>.<nonce>.tmp ─▶ fsync ─▶ rename into place ─▶ fsync dir
      │ OSError: tmp unlinked, reservation released          │
      ▼                                                      ▼ commit (reservation becomes the row's bytes)
    RELEASED                                              PUBLISHED ─▶ announced (index.add by the store)
                                                             │  load: pin ─ read once, verify once ─ unpin
                                                             │  (pinned rows are skipped by eviction)
                                                             ▼  LRU eviction / remove / corrupt on load
                                                           GONE ─▶ on_drop(key) (the index forgets it)

    A writer killed anywhere before the rename leaves only its temp file: nothing is visible under the final
    name, and the next startup scan deletes temp files whose writer process is gone. A killed writer after the
    rename leaves a complete, checksummed row, which the scan registers from its header.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from erllama.cache.counters import Counters
from erllama.cache.key import CacheKey
from erllama.cache.kvc import RowMeta
from erllama.errors import InvalidInputError

__all__ = ["RamTier", "Tier"]  # FileTier: erllama.cache.filetier

log = logging.getLogger("erllama.cache")

Payload = bytes | bytearray | memoryview


DropHook = Callable[[CacheKey], None]


class Tier(Protocol):
    """What every tier offers. ``on_drop`` is called with every key that leaves the tier, for whatever reason."""

    name: str
    on_drop: DropHook | None
    counters: Counters  # the store sets its own (see CacheStore)

    @property
    def budget_bytes(self) -> int: ...

    @property
    def used_bytes(self) -> int: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def publish(self, meta: RowMeta, payload: Payload) -> bool:
        """Store a row; False when it was refused (larger than the budget, or no unpinned room)."""
        ...

    def load(self, key: CacheKey) -> tuple[RowMeta, memoryview] | None:
        """The row's metadata and state, or None if absent or corrupt (corrupt rows are dropped and counted)."""
        ...

    def remove(self, key: CacheKey) -> bool: ...

    def evict(self, n_bytes: int) -> int:
        """Evict least-recently-used unpinned rows until at least ``n_bytes`` are freed; returns bytes freed."""
        ...

    def metas(self) -> list[RowMeta]: ...

    def meta_of(self, key: CacheKey) -> RowMeta | None:
        """One row's metadata (None when the tier does not hold it, or it cannot be read)."""
        ...

    def size_of(self, key: CacheKey) -> int | None:
        """The bytes a row takes in this tier (None when the tier does not hold it)."""
        ...

    def row_keys(self) -> list[CacheKey]:
        """The rows held, least recently used first."""
        ...

    def refresh(self) -> list[RowMeta]:
        """Rows other processes published to this tier since the last call (a shared file tier); else []."""
        ...


class Budget:
    """LRU order, sizes, pins and reservations of one tier. All methods take the tier's lock themselves."""

    def __init__(self, name: str, budget_bytes: int, counters: Counters) -> None:
        if budget_bytes < 0:
            raise InvalidInputError("a tier budget must be >= 0 bytes")
        self.name = name
        self.budget_bytes = budget_bytes
        self.counters = counters
        self.lock = threading.Lock()
        self.sizes: OrderedDict[CacheKey, int] = OrderedDict()  # least recently used first
        self.pins: dict[CacheKey, int] = {}
        self.reserved = 0
        self.used = 0

    def _gauges(self) -> None:
        self.counters.set_gauge(f"{self.name}_bytes", self.used)
        self.counters.set_gauge(f"{self.name}_rows", len(self.sizes))

    def reserve(self, key: CacheKey, size: int) -> list[tuple[CacheKey, int]] | None:
        """Make room for ``size`` bytes; returns the (key, size) rows evicted for it, or None if it cannot fit."""
        if size > self.budget_bytes:
            self.counters.incr(f"{self.name}_refused_too_large")
            return None
        with self.lock:
            # Choose the victims first and evict only if they make enough room: a refused publish evicts nothing.
            need = self.used + self.reserved + size - self.budget_bytes
            victims: list[CacheKey] = []
            for k, k_size in self.sizes.items():
                if need <= 0:
                    break
                if self.pins.get(k) or k == key:
                    continue
                victims.append(k)
                need -= k_size
            if need > 0:
                self.counters.incr(f"{self.name}_refused_no_room")
                return None
            evicted = [(k, self.sizes.pop(k)) for k in victims]
            self.used -= sum(k_size for _, k_size in evicted)
            self.reserved += size
            self._gauges()
        self.counters.incr("evictions", len(evicted))
        return evicted

    def commit(self, key: CacheKey, size: int) -> None:
        """Turn a reservation into a stored row (replacing an older row of the same key)."""
        with self.lock:
            self.reserved -= size
            old = self.sizes.pop(key, None)
            if old is not None:
                self.used -= old
            self.sizes[key] = size
            self.used += size
            self._gauges()

    def release(self, size: int) -> None:
        """Give back a reservation whose write failed."""
        with self.lock:
            self.reserved -= size

    def touch_and_pin(self, key: CacheKey) -> bool:
        with self.lock:
            if key not in self.sizes:
                return False
            self.sizes.move_to_end(key)
            self.pins[key] = self.pins.get(key, 0) + 1
            return True

    def unpin(self, key: CacheKey) -> None:
        with self.lock:
            left = self.pins.get(key, 0) - 1
            if left > 0:
                self.pins[key] = left
            else:
                self.pins.pop(key, None)

    def forget(self, key: CacheKey) -> bool:
        with self.lock:
            size = self.sizes.pop(key, None)
            if size is None:
                return False
            self.used -= size
            self._gauges()
            return True

    def lru_victims(self, n_bytes: int) -> list[CacheKey]:
        with self.lock:
            out, freed = [], 0
            for key, size in self.sizes.items():
                if freed >= n_bytes:
                    break
                if not self.pins.get(key):
                    out.append(key)
                    freed += size
            return out


class TierBase:
    """The budget, name and drop hook every tier has, and the accessors that read them."""

    def __init__(self, name: str, budget_bytes: int, counters: Counters | None) -> None:
        self.name = name
        self.on_drop: DropHook | None = None
        self._b = Budget(name, budget_bytes, counters or Counters())

    @property
    def counters(self) -> Counters:
        return self._b.counters

    @counters.setter
    def counters(self, counters: Counters) -> None:
        self._b.counters = counters

    @property
    def budget_bytes(self) -> int:
        return self._b.budget_bytes

    @property
    def used_bytes(self) -> int:
        return self._b.used

    def __len__(self) -> int:
        return len(self._b.sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._b.sizes

    def size_of(self, key: CacheKey) -> int | None:
        return self._b.sizes.get(key)

    def row_keys(self) -> list[CacheKey]:
        with self._b.lock:
            return list(self._b.sizes)


class RamTier(TierBase):
    """Rows in this process's memory: the state bytes (copied once) and their metadata."""

    def __init__(self, budget_bytes: int, counters: Counters | None = None, *, name: str = "ram") -> None:
        super().__init__(name, budget_bytes, counters)
        self._rows: dict[CacheKey, tuple[RowMeta, bytes | memoryview]] = {}

    def publish(self, meta: RowMeta, payload: Payload) -> bool:
        return self._put(meta, bytes(payload))

    def publish_owned(self, meta: RowMeta, payload: memoryview) -> bool:
        """:meth:`publish` a buffer no one else holds or reuses (a row just read from a file, promoted here): it is
        kept as it is, not copied."""
        return self._put(meta, payload.toreadonly())

    def _put(self, meta: RowMeta, data: bytes | memoryview) -> bool:
        evicted = self._b.reserve(meta.key, len(data))
        if evicted is None:
            return False
        for key, _size in evicted:
            self._rows.pop(key, None)
        self._rows[meta.key] = (meta, data)
        self._b.commit(meta.key, len(data))
        notify_dropped(self.on_drop, [k for k, _ in evicted])
        return True

    def load(self, key: CacheKey) -> tuple[RowMeta, memoryview] | None:
        if not self._b.touch_and_pin(key):
            return None
        try:
            row = self._rows.get(key)
            return None if row is None else (row[0], memoryview(row[1]))
        finally:
            self._b.unpin(key)

    def remove(self, key: CacheKey) -> bool:
        self._rows.pop(key, None)
        gone = self._b.forget(key)
        if gone:
            notify_dropped(self.on_drop, [key])
        return gone

    def evict(self, n_bytes: int) -> int:
        freed = 0
        for key in self._b.lru_victims(n_bytes):
            row = self._rows.get(key)
            if row is not None and self.remove(key):
                freed += len(row[1])
                self._b.counters.incr("evictions")
        return freed

    def metas(self) -> list[RowMeta]:
        return [meta for meta, _ in list(self._rows.values())]

    def meta_of(self, key: CacheKey) -> RowMeta | None:
        row = self._rows.get(key)
        return None if row is None else row[0]

    def refresh(self) -> list[RowMeta]:
        return []  # this process's memory: nobody else publishes here


def notify_dropped(hook: DropHook | None, keys: list[CacheKey]) -> None:
    if hook is not None:
        for key in keys:
            hook(key)
