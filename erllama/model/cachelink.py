"""``CacheLink``: one model worker's side of the shared cache — restoring prefixes at admission and saving states.

Admission restores the most of the request's context the cache holds, capped one token short of its end (the last
prompt token is always computed, for its logits): the longest stored row that is a prefix of the context, or a
longer row cut back to its common prefix with it. A restore is checked (the row's tokens against the context, the
sequence's length after ``state_set``, and — for a cut — that the cache still holds what the continuation needs);
a row that fails is dropped and the request goes cold.

Saves follow the policy gates (``erllama.cache.policy``). Reading the state out of the context is one copy on the
worker thread; packing and publishing happen on the store's writer threads, so other sequences never wait on disk.
Finish keys are remembered with their tokens, so a ``parent_key`` continuation knows its context even when its row
was dropped or is still being written.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

from erllama.cache.counters import Counters, HitKind
from erllama.cache.key import CacheKey, Namespace, cache_key, ctx_params_hash
from erllama.cache.kvc import SaveReason
from erllama.cache.policy import (
    SavePolicy,
    Veto,
    allows_continued_save,
    allows_final_save,
    cold_save_point,
)
from erllama.cache.store import CacheStore
from erllama.errors import ErllamaError, StateError
from erllama.model.backend import BackendInfo, ModelBackend

__all__ = ["CacheHit", "CacheLink", "namespace_for"]


def namespace_for(info: BackendInfo, adapters: Sequence[tuple[str, float]] = (), salt: str = "") -> Namespace:
    """The cache namespace of a loaded model: its file, quantisation, KV layout, adapters with scales, salt."""
    return Namespace(
        model_fingerprint=info.fingerprint,
        quantization=info.quantization,
        ctx_params=ctx_params_hash(info.ctx_params),
        adapters=tuple(adapters),
        salt=salt,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class CacheHit:
    """How a request's context was found: ``exact`` (all but the last token restored), ``partial`` or ``cold``."""

    kind: str
    prefix_len: int


_COLD = CacheHit("cold", 0)


class CacheLink:
    """Restores and saves sequences of one backend in one namespace of a shared :class:`CacheStore`."""

    def __init__(self, store: CacheStore, policy: SavePolicy, namespace: Namespace, *, remember: int = 4096) -> None:
        self.store = store
        self.policy = policy
        self.namespace = namespace
        self._remember = remember
        self._recent: OrderedDict[CacheKey, tuple[int, ...]] = OrderedDict()

    @property
    def counters(self) -> Counters:
        return self.store.counters

    def key(self, tokens: Sequence[int]) -> CacheKey:
        return cache_key(self.namespace, tokens)

    # -- parent_key continuations ------------------------------------------------------------------------------

    def remember(self, key: CacheKey, tokens: Sequence[int]) -> None:
        self._recent[key] = tuple(tokens)
        self._recent.move_to_end(key)
        while len(self._recent) > self._remember:
            self._recent.popitem(last=False)

    def parent_tokens(self, key: CacheKey) -> tuple[int, ...] | None:
        """The tokens a finish key stands for: remembered by this worker, or read from the row's metadata."""
        known = self._recent.get(key)
        if known is not None:
            return known
        row = self.store.load(key)
        if row is None or row[0].namespace != self.namespace:
            return None
        return row[0].tokens

    def parent_pending(self, key: CacheKey) -> bool:
        """Whether the parent's row is still being written (its restore should wait for it)."""
        return self.store.pending(key)

    # -- admission ----------------------------------------------------------------------------------------------

    def restore(self, backend: ModelBackend, seq_id: int, tokens: Sequence[int], parent: CacheKey | None) -> CacheHit:
        """Restore the most of ``tokens`` the cache can give (at most ``len(tokens) - 1``) into an empty ``seq_id``;
        returns what was found. On any failure the sequence is left empty (cold).

        Candidates: the longest stored row that is a prefix of ``tokens``, and, when a longer stored row has a longer
        common prefix with ``tokens`` than that (the same document followed by another question), that row, restored
        and then cut back to the common prefix. Cutting back fails on caches that already dropped what the cut-back
        sequence would need (sliding-window caches without ``swa_full``); the prefix row is tried next.
        """
        limit = len(tokens) - 1
        index = self.store.index
        prefix = index.longest_prefix(self.namespace, tokens, max_tokens=limit) if limit > 0 else None
        short = limit > 0 and (prefix is None or prefix.n_tokens < limit)
        shared = index.deepest_shared(self.namespace, tokens, max_tokens=limit) if short else None
        candidates = [c for c in (shared,) if c is not None and c.n_tokens > (prefix.n_tokens if prefix else 0)]
        candidates += [prefix] if prefix is not None else []
        for hit in candidates:
            n = self._restore_row(backend, seq_id, tokens, hit.key, n=hit.n_tokens, limit=limit)
            if n:
                if hit.key == parent:
                    counted = HitKind.RESUME
                elif n == limit:
                    counted = HitKind.EXACT
                else:
                    counted = HitKind.LONGEST_PREFIX
                self.counters.record_hit(counted)
                self.counters.incr("restored_tokens", n)
                return CacheHit("exact" if n == limit else "partial", n)
        self.counters.record_hit(HitKind.MISS)
        return _COLD

    def _restore_row(
        self, backend: ModelBackend, seq_id: int, tokens: Sequence[int], key: CacheKey, *, n: int, limit: int
    ) -> int:
        """Restore a row whose first ``n`` tokens (``n <= limit``, as the index found them) equal ``tokens[:n]`` and
        keep exactly those. Returns ``n``, or 0 on failure (the sequence is then empty)."""
        row = self.store.load(key)
        if row is None:  # dropped between the index walk and the load
            return 0
        meta, payload = row
        try:
            if meta.n_tokens < n or meta.tokens[:n] != tuple(tokens[:n]):
                raise StateError("the row's tokens differ from the prompt prefix it was indexed under")
            backend.state_set(seq_id, payload)
            if backend.seq_len(seq_id) != meta.n_tokens:
                raise StateError(f"restored {backend.seq_len(seq_id)} positions, expected {meta.n_tokens}")
        except StateError:
            self.counters.incr("restore_failures")
            self.store.remove(key)
            backend.seq_truncate(seq_id, 0)
            return 0
        keep = min(n, limit)
        if meta.n_tokens > keep:
            try:
                backend.seq_truncate(seq_id, keep)
            except ErllamaError:
                self.counters.incr("restore_cut_refused")
                backend.seq_truncate(seq_id, 0)
                return 0
            if backend.seq_len(seq_id) != keep:
                self.counters.incr("restore_cut_refused")
                backend.seq_truncate(seq_id, 0)
                return 0
        return keep

    def probe(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` are stored (counts nothing)."""
        hit = self.store.index.longest_prefix(self.namespace, tokens)
        return hit.n_tokens if hit is not None else 0

    # -- save points --------------------------------------------------------------------------------------------

    def cold_point(self, n_prompt: int, restored: int) -> int | None:
        """Where to save a prompt while prefilling it, or None (vetoed, or already covered by the restore)."""
        point = cold_save_point(self.policy, n_prompt)
        if isinstance(point, Veto):
            self.counters.record_veto(point)
            return None
        return point if point > restored else None

    def continued_due(self, n_tokens: int, since_last_save: int) -> bool:
        return allows_continued_save(self.policy, n_tokens, since_last_save) is None

    def final_allowed(self, n_tokens: int) -> bool:
        veto = allows_final_save(self.policy, n_tokens)
        if veto is not None:
            self.counters.record_veto(veto)
        return veto is None

    def save(
        self, backend: ModelBackend, seq_id: int, tokens: Sequence[int], reason: SaveReason, *, reserved: bool = False
    ) -> CacheKey:
        """Copy the sequence's state out (on this thread) and hand it to the store's writer. ``reserved``: this
        caller holds the key's reservation (:meth:`reserve`), which the save fills."""
        key = self.key(tokens)
        if not reserved and (key in self.store or self.store.pending(key)):
            self.counters.incr("saves_already_cached")
            return key
        self.store.save(self.namespace, tokens, backend.state_get(seq_id), reason)
        return key

    def reserve(self, tokens: Sequence[int]) -> bool:
        """Mark a save of ``tokens`` as in flight before the state holds them all (see ``CacheStore.reserve``);
        False when the row is already stored or in flight."""
        return self.store.reserve(self.namespace, tokens)

    def release(self, tokens: Sequence[int]) -> None:
        """Give up a reservation taken with :meth:`reserve`."""
        self.store.release(self.namespace, tokens)

    def save_sync(
        self, backend: ModelBackend, seq_id: int, tokens: Sequence[int], reason: SaveReason, timeout_s: float
    ) -> bool:
        """Evict and shutdown saves: publish before returning (bounded by ``timeout_s``)."""
        return self.store.save_sync(self.namespace, tokens, backend.state_get(seq_id), reason, timeout_s)
