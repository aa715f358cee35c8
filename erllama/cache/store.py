"""``CacheStore``: the cache as the runtime sees it: lookup, load, save, evict, over tiers, index and writer.

Tiers are ordered fastest first and inclusive: a save is written through to every tier (off the caller's thread),
so a row the RAM tier evicts is still on disk; a load is served by the fastest tier holding the row, and a hit in a
slower tier is promoted back into the fastest one (on a writer thread, off the request's time to first token). The
prefix index knows every row of every tier; tiers report each key that leaves them, and the index forgets a key once
no tier holds it. Concurrent saves of one key are
deduplicated: the second caller gets the first caller's future. A save can be reserved before its payload exists
(a reply announced before its last token is committed): the key counts as in flight from then on, and whoever needs
the row (a ``parent_key`` resume) can be called back when it settles. The store is the only user of the prefix index
and counts every save once; the worker's ``CacheLink`` counts the hits it makes of what the store finds.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial

import numpy as np
import numpy.typing as npt

from erllama.cache.counters import Counters
from erllama.cache.index import PrefixHit, PrefixIndex, RouteSummary
from erllama.cache.key import CacheKey, Namespace, cache_key
from erllama.cache.kvc import RowMeta, SaveReason
from erllama.cache.tier import Payload, RamTier, Tier
from erllama.cache.writer import SaveWriter
from erllama.errors import InvalidInputError

__all__ = ["CacheStore", "RowInfo"]

PRODUCER = "erllama 0.1.0"

log = logging.getLogger("erllama.cache")
_last_write_log: dict[tuple[str, int | None], float] = {}


def _log_write_error(tier: str, exc: OSError) -> None:
    """Log a failed write, at most once a minute per tier and errno (a full disk fails every save)."""
    now = time.monotonic()
    what = (tier, exc.errno)
    if now - _last_write_log.get(what, -1e9) >= 60.0:
        _last_write_log[what] = now
        log.warning("cache tier %s: a save failed: %s (counted in %s_write_errors)", tier, exc, tier)


@dataclasses.dataclass(frozen=True, slots=True)
class RowInfo:
    """A stored row as ``erllama cache ls`` shows it: its metadata, the bytes it takes in each tier holding it,
    how often requests restored it (over its file's life, where a file tier recorded it, and since startup), and
    when last (wall clock, ns; 0: never)."""

    meta: RowMeta
    tiers: dict[str, int]
    hits: int
    last_used_ns: int


class CacheStore:
    """Tiers (fastest first) + prefix index + writer + counters."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        counters: Counters | None = None,
        *,
        writer: SaveWriter | None = None,
        promote: bool = True,
    ) -> None:
        if not tiers:
            raise InvalidInputError("a cache needs at least one tier")
        self.tiers = list(tiers)
        self.counters = counters or Counters()
        for tier in self.tiers:  # one set of counters: what the tiers counted so far (their startup scan) moves over
            tier.counters = self.counters.adopt(tier.counters)
        self.writer = writer or SaveWriter(self.counters)
        self.promote = promote
        self.index = PrefixIndex()
        self._lock = threading.Lock()
        self._inflight: dict[CacheKey, Future[bool]] = {}
        self._reserved: dict[CacheKey, Future[bool]] = {}  # in _inflight too, until filled by save() or released
        self._promoting: set[Future[bool]] = set()  # copies of slower tiers' hits into the fastest, in flight
        self._uses: dict[CacheKey, tuple[int, int]] = {}  # restores of a row since startup, and the last one's time
        for tier in self.tiers:
            tier.on_drop = self._dropped
            for meta in tier.metas():
                self.index.add(meta.namespace, meta.tokens)

    def _dropped(self, key: CacheKey) -> None:
        if not any(key in tier for tier in self.tiers):
            self.index.remove(key)
            with self._lock:
                self._uses.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return any(key in tier for tier in self.tiers)

    # -- lookup and load ----------------------------------------------------------------------------------------

    def longest_prefix(
        self, namespace: Namespace, tokens: Sequence[int] | npt.NDArray[np.integer], max_tokens: int | None = None
    ) -> PrefixHit | None:
        """The longest stored row that is a prefix of ``tokens`` (at most ``max_tokens`` long); counts nothing (the
        caller counts the hit it makes of it). Rows other processes published to a shared tier are learned first."""
        self.refresh()
        return self.index.longest_prefix(namespace, tokens, max_tokens=max_tokens)

    def deepest_shared(self, namespace: Namespace, tokens: Sequence[int], max_tokens: int) -> PrefixHit | None:
        """The stored row sharing the longest common prefix with ``tokens`` (see PrefixIndex.deepest_shared)."""
        return self.index.deepest_shared(namespace, tokens, max_tokens=max_tokens)

    def refresh(self) -> int:
        """Register the rows other processes published to shared tiers (and forget those they deleted) since the
        last look; returns how many were learned. One stat per shared root when nothing changed."""
        learned = 0
        for tier in self.tiers:
            for meta in tier.refresh():
                self.index.add(meta.namespace, meta.tokens)
                learned += 1
        return learned

    def summary(self, max_links: int = 1 << 16) -> RouteSummary:
        """What a router needs to know of this cache (see :class:`~erllama.cache.index.RouteSummary`)."""
        self.refresh()
        return self.index.summary(max_links)

    def nearest(self, namespace: Namespace, tokens: Sequence[int]) -> PrefixHit | None:
        """The stored row sharing the longest prefix with ``tokens`` (to explain a miss; see PrefixIndex.nearest)."""
        return self.index.nearest(namespace, tokens)

    def tokens_of(self, key: CacheKey) -> npt.NDArray[np.int32] | None:
        """A stored row's tokens, from the index (no I/O)."""
        return self.index.tokens_of(key)

    def load(self, key: CacheKey) -> tuple[RowMeta, memoryview] | None:
        """The row from the fastest tier that has it (promoting it upwards), or None."""
        row = self.load_from(key)
        return None if row is None else (row[0], row[1])

    def load_from(self, key: CacheKey) -> tuple[RowMeta, memoryview, str] | None:
        """:meth:`load`, also naming the tier that served the row."""
        t0 = time.perf_counter()
        for i, tier in enumerate(self.tiers):
            row = tier.load(key)
            if row is None:
                continue
            if self.promote and i > 0 and row[0].key not in self.tiers[0]:
                # copied up on a writer thread: the request that hit the slower tier does not wait for the copy
                meta, payload = row
                future = self.writer.submit(partial(self._promote, meta, payload), dropped="promotions_dropped")
                if future is not None:
                    with self._lock:
                        self._promoting.add(future)
                    future.add_done_callback(self._promoted)
            self.counters.record_latency("load", time.perf_counter() - t0)
            return row[0], row[1], tier.name
        return None

    def _promoted(self, future: Future[bool]) -> None:
        with self._lock:
            self._promoting.discard(future)

    def _promote(self, meta: RowMeta, payload: memoryview) -> bool:
        fastest = self.tiers[0]
        if meta.key in fastest:
            return False
        try:  # the payload is a buffer of its own (read from a file): a RAM tier keeps it without a copy
            taken = (
                fastest.publish_owned(meta, payload) if isinstance(fastest, RamTier) else fastest.publish(meta, payload)
            )
        except OSError as exc:
            _log_write_error(fastest.name, exc)
            return False
        if taken:
            self.index.add(meta.namespace, meta.tokens)  # (a no-op unless the slower tier dropped it meanwhile)
            self.counters.incr("promotions")
        return taken

    # -- what users see of it -----------------------------------------------------------------------------------

    def record_use(self, key: CacheKey, tier: str, restored_tokens: int) -> None:
        """A request restored ``restored_tokens`` of this row, served by ``tier`` (counted per row and per tier)."""
        with self._lock:
            count, _ = self._uses.get(key, (0, 0))
            self._uses[key] = (count + 1, time.time_ns())
        self.counters.incr(f"{tier}_restored_tokens", restored_tokens)

    def row(self, key: CacheKey) -> RowInfo | None:
        """One stored row as a listing shows it, or None."""
        meta = next((m for m in (t.meta_of(key) for t in self.tiers) if m is not None), None)
        return None if meta is None else self._info(meta)

    def rows(self) -> list[RowInfo]:
        """Every stored row (each once, whatever tiers hold it), most recently used first."""
        self.refresh()
        metas: dict[CacheKey, RowMeta] = {}
        for tier in self.tiers:
            for meta in tier.metas():
                metas.setdefault(meta.key, meta)
        rows = [self._info(meta) for meta in metas.values()]
        rows.sort(key=lambda r: max(r.last_used_ns, r.meta.created_ns), reverse=True)
        return rows

    def _info(self, meta: RowMeta) -> RowInfo:
        sizes = {t.name: size for t in self.tiers if (size := t.size_of(meta.key)) is not None}
        with self._lock:
            count, last = self._uses.get(meta.key, (0, 0))
        return RowInfo(meta, sizes, meta.hit_count + count, max(last, meta.last_used_ns))

    def tier_tokens(self) -> dict[str, int]:
        """Prompt tokens held per tier (what rows each tier holds would restore)."""
        out: dict[str, int] = {}
        for tier in self.tiers:
            out[tier.name] = sum(self.index.n_tokens(k) or 0 for k in tier.row_keys())
        return out

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every save (and promotion) in flight now is published (or refused); False on timeout."""
        with self._lock:
            futures = [*self._inflight.values(), *self._promoting]
        try:
            for future in futures:
                future.result(timeout=timeout_s)
        except FutureTimeout:
            return False
        return True

    def pending(self, key: CacheKey) -> bool:
        """Whether a save of ``key`` is in flight (queued or being written)."""
        with self._lock:
            future = self._inflight.get(key)
        return future is not None and not future.done()

    def when_settled(self, key: CacheKey, callback: Callable[[], None]) -> bool:
        """Call ``callback()`` (on the writer's thread) once the save of ``key`` in flight now is published or
        given up; False, and no call, when none is in flight. A ``parent_key`` request waiting for its parent's row
        is woken this way instead of polling."""
        with self._lock:
            future = self._inflight.get(key)
        if future is None or future.done():
            return False
        future.add_done_callback(lambda _: callback())
        return True

    # -- saves --------------------------------------------------------------------------------------------------

    def _meta(
        self, namespace: Namespace, tokens: Sequence[int] | npt.NDArray[np.integer], reason: SaveReason
    ) -> RowMeta:
        toks = tuple(int(t) for t in tokens)
        return RowMeta(
            key=cache_key(namespace, toks),
            namespace=namespace,
            tokens=toks,
            save_reason=reason,
            created_ns=time.time_ns(),
            producer=PRODUCER,
        )

    def _publish(self, meta: RowMeta, payload: Payload) -> bool:
        t0 = time.perf_counter()
        try:
            accepted = False
            for tier in self.tiers:  # restorable from the first tier that takes it, while slower tiers write
                try:
                    taken = tier.publish(meta, payload)
                except OSError as exc:  # a full or read-only disk: counted by the tier; the other tiers go on
                    _log_write_error(tier.name, exc)
                    continue
                if taken:
                    self.index.add(meta.namespace, meta.tokens)  # again after a slower tier: a no-op, unless the
                    accepted = True  # faster tier dropped the row meanwhile and the index forgot it
            if not accepted:
                self.counters.incr("saves_refused")
                return False
            self.counters.record_save(meta.save_reason)
            self.counters.record_latency("save", time.perf_counter() - t0)
            return True
        finally:
            with self._lock:
                self._inflight.pop(meta.key, None)

    def save(
        self,
        namespace: Namespace,
        tokens: Sequence[int] | npt.NDArray[np.integer],
        payload: Payload | Callable[[], Payload],
        reason: SaveReason,
    ) -> Future[bool] | None:
        """Publish a row off the caller's thread. Returns the save's future (shared by concurrent saves of the
        same key), or None when the row is already stored or the writer is full (then counted as dropped).

        ``payload`` may be a callable that reads it (a sequence's state copy): it is called on the caller's thread
        only when the row is neither stored nor in flight, so a save that would be deduplicated costs no copy.
        Every save is counted here, once: ``saves_deduplicated``, ``saves_already_cached`` or by its reason.
        """
        meta = self._meta(namespace, tokens, reason)
        with self._lock:
            reserved = self._reserved.pop(meta.key, None)
            if reserved is None and meta.key in self._inflight:
                self.counters.incr("saves_deduplicated")
                return self._inflight[meta.key]
            if reserved is None and meta.key in self:
                self.counters.incr("saves_already_cached")
                return None
            if reserved is None and callable(payload):  # in flight while its bytes are read, outside the lock
                reserved = self._inflight[meta.key] = Future()
                claimed = True
            else:
                claimed = False
        try:
            data = payload() if callable(payload) else payload
        except BaseException:
            if reserved is not None:  # the reservation (ours or the caller's) will not be filled
                with self._lock:
                    self._inflight.pop(meta.key, None)
                reserved.set_result(False)
            raise
        with self._lock:
            future = self.writer.submit(lambda: self._publish(meta, data))
            if reserved is not None:
                if future is None:
                    self._inflight.pop(meta.key, None)
                    reserved.set_result(False)
                else:
                    future.add_done_callback(lambda f: reserved.set_result(f.exception() is None and f.result()))
                return None if claimed and future is None else reserved
            if future is not None and not future.done():
                self._inflight[meta.key] = future
        return future

    def reserve(self, namespace: Namespace, tokens: Sequence[int]) -> bool:
        """Announce a save of ``tokens`` whose payload is not read yet. Until :meth:`save` fills it or
        :meth:`release` gives it up, the key is in flight: ``pending`` is true, and ``drain``, ``wait_for`` and
        ``resume`` wait for it. False (nothing reserved) when the key is already stored or in flight."""
        key = cache_key(namespace, tokens)
        with self._lock:
            if key in self._inflight or key in self:
                return False
            self._reserved[key] = self._inflight[key] = Future()
        return True

    def release(self, namespace: Namespace, tokens: Sequence[int]) -> None:
        """Give up a reservation that will not be filled (its waiters see the key absent)."""
        key = cache_key(namespace, tokens)
        with self._lock:
            reserved = self._reserved.pop(key, None)
            if reserved is not None:
                self._inflight.pop(key, None)
        if reserved is not None:
            reserved.set_result(False)

    def save_sync(
        self,
        namespace: Namespace,
        tokens: Sequence[int] | npt.NDArray[np.integer],
        payload: Payload | Callable[[], Payload],
        reason: SaveReason,
        timeout_s: float,
    ) -> bool:
        """Publish a row and wait up to ``timeout_s`` (evict and shutdown saves); a callable ``payload`` is read
        only when the row is not stored yet."""
        meta = self._meta(namespace, tokens, reason)
        if meta.key in self:
            return True
        data = payload() if callable(payload) else payload
        return self.writer.run_sync(lambda: self._publish(meta, data), timeout_s)

    # -- eviction -----------------------------------------------------------------------------------------------

    def evict_bytes(self, n_bytes: int) -> int:
        """Free about ``n_bytes`` from the slowest tiers first (an evict hook for the pressure scheduler)."""
        freed = 0
        for tier in reversed(self.tiers):
            if freed >= n_bytes:
                break
            freed += tier.evict(n_bytes - freed)
        return freed

    def remove(self, key: CacheKey) -> bool:
        removed = False
        for tier in self.tiers:
            removed = tier.remove(key) or removed
        return removed

    def close(self) -> None:
        self.writer.shutdown(wait=True)
