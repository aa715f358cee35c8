"""``CacheLink``: one model worker's only door to the shared cache, named by a request's lifecycle.

============  ================================================================================================
call          what it does
============  ================================================================================================
on_admit      restore the longest stored prefix of the request's context into its sequence; count the hit; set
              the prompt's cold save point
on_step       after a step fed the sequence: the cold save (the prompt, at its save point) and continued saves
on_finish     the reply ended: may its finish row be saved, and must the sequence close first (then the row is
              reserved, so a ``parent_key`` resume or a drain waits for it)
on_announce   the finish key of the context the reply leaves (remembered with its tokens)
on_close      the sequence is freed: write its finish row, or give up the reservation
save_live     evict and shutdown saves of the sequences still running
============  ================================================================================================

Admission restores the most of the request's context the cache holds, capped one token short of its end (the last
prompt token is always computed, for its logits): the longest stored row that is a prefix of the context, or a
longer row cut back to its common prefix with it. A restore is checked (the row's tokens against the context, the
sequence's length after ``state_set``, and — for a cut — that the cache still holds what the continuation needs);
a row that fails is dropped and the request goes cold.

Saves follow the policy gates (``erllama.cache.policy``). Reading the state out of the context is one copy on the
worker thread, made only when the store wants the row; packing and publishing happen on the store's writer threads,
so other sequences never wait on disk. Finish keys are remembered with their tokens, so a ``parent_key``
continuation knows its context even when its row was dropped or is still being written; a request that must wait
for a row being written is woken by the save's completion.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from erllama.cache.counters import Counters, HitKind
from erllama.cache.index import PrefixHit
from erllama.cache.key import CacheKey, Namespace, cache_key, ctx_params_hash
from erllama.cache.kvc import RowMeta, SaveReason
from erllama.cache.policy import (
    SavePolicy,
    Veto,
    allows_continued_save,
    allows_final_save,
    cold_save_point,
)
from erllama.cache.report import CONTEXT_TOKENS, CacheReport
from erllama.cache.store import CacheStore
from erllama.errors import ErllamaError, StateError
from erllama.model.backend import BackendInfo, ModelBackend

__all__ = ["Admission", "CacheHit", "CacheLink", "CachedSequence", "FinishPlan", "SeqCache", "namespace_for"]

MERGE_TOKENS = 64  # a client's save point this close below a later one is left to the later one


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
    """How a request's context was found: its kind, how many tokens were restored, whether it was its parent's row,
    the tier that served it, and — when less than all was restored — the cached row nearest the context: its
    length, how many tokens the context shares with it, and its tokens from there on."""

    kind: HitKind
    prefix_len: int
    resumed: bool = False
    tier: str | None = None
    row_tokens: int = 0
    shared_tokens: int = 0
    row_next: tuple[int, ...] = ()

    def report(self, tokens: Sequence[int], n_prompt: int | None = None) -> CacheReport:
        """The request's :class:`~erllama.cache.report.CacheReport` (``tokens``: its context, of which the first
        ``n_prompt`` are the prompt; all of them by default)."""
        n = len(tokens) if n_prompt is None else n_prompt
        at = self.shared_tokens
        return CacheReport(
            kind=self.kind,
            prompt_tokens=n,
            restored_tokens=self.prefix_len,
            tier=self.tier,
            row_tokens=self.row_tokens,
            shared_tokens=at,
            before=tuple(tokens[max(0, at - CONTEXT_TOKENS) : at]) if self.row_tokens else (),
            row_next=self.row_next,
            prompt_next=tuple(tokens[at : min(at + CONTEXT_TOKENS, n)]) if self.row_tokens else (),
        )


COLD = CacheHit(HitKind.COLD, 0)


@dataclasses.dataclass(slots=True)
class SeqCache:
    """A running sequence's standing with the cache; only :class:`CacheLink` changes it.

    Attributes:
        enabled: restore and save this sequence (off once its KV mixes two adapter settings).
        cold_point: where its prompt is saved next while prefilling (None: no save due).
        last_save: how many of its tokens the last save (or the restore) covered.
        reserved: it holds the reservation of its finish row (taken when it began closing).
        later: the prompt's save points after ``cold_point``, in order, with their reasons (a client's
            breakpoints are ``MANUAL``; the policy's point is ``COLD``).
        reason: why ``cold_point`` is saved.
    """

    enabled: bool
    cold_point: int | None = None
    last_save: int = 0
    reserved: bool = False
    later: list[tuple[int, SaveReason]] = dataclasses.field(default_factory=list)
    reason: SaveReason = SaveReason.COLD

    def next_point(self) -> None:
        """Move on to the next save point (None when none is left)."""
        if self.later:
            self.cold_point, self.reason = self.later.pop(0)
        else:
            self.cold_point = None


class CachedSequence(Protocol):
    """What the link reads of a running sequence."""

    @property
    def seq_id(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def n_prompt(self) -> int: ...
    @property
    def fed(self) -> int: ...
    @property
    def ended(self) -> bool: ...
    @property
    def cache(self) -> SeqCache: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`CacheLink.on_admit` did: the hit, and the sequence's standing with the cache from then on."""

    hit: CacheHit
    cache: SeqCache


@dataclasses.dataclass(frozen=True, slots=True)
class FinishPlan:
    """How an ended reply leaves the cache: ``save`` its finish row; ``close_first``: its last token is not
    committed yet, so the sequence closes with a later step (its row reserved meanwhile) before the save."""

    save: bool
    close_first: bool


class CacheLink:
    """Restores and saves sequences of one backend in one namespace of a shared :class:`CacheStore`."""

    def __init__(self, store: CacheStore, policy: SavePolicy, namespace: Namespace, *, remember: int = 4096) -> None:
        self.store = store
        self.policy = policy
        self.namespace = namespace
        self._remember = remember
        self._recent: OrderedDict[CacheKey, tuple[int, ...]] = OrderedDict()
        # finish rows announced but not restorable yet: their context and how much of it was the prompt
        self._finishing: dict[CacheKey, tuple[tuple[int, ...], int]] = {}

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

    def parent_pending(self, key: CacheKey, wake: Callable[[], None]) -> bool:
        """Whether the parent's row is still being written (its restore should wait for it); ``wake()`` is called
        once it is settled."""
        return self.store.when_settled(key, wake)

    def continued_reply(self, tokens: Sequence[int], wake: Callable[[], None]) -> tuple[int, ...] | None:
        """The context of a reply whose finish row is still being written and that ``tokens`` continue (the next
        turn of a chat, sent the moment the reply ended), or None; ``wake()`` is called once that row is settled.
        "Continue": share that request's prompt and the reply's first token (a chat template may render the reply's
        end differently from the tokens that ended it, so the whole reply need not match), or — a prompt no longer
        than that one — all the row could restore of it (a repeated prompt)."""
        for key, (context, n_prompt) in list(self._finishing.items()):
            if key in self.store or not self.store.pending(key):
                del self._finishing[key]
            elif (m := min(n_prompt + 1, len(tokens) - 1, len(context))) > 0 and tuple(tokens[:m]) == context[:m]:
                if self.store.when_settled(key, wake):
                    return context
                del self._finishing[key]
        return None

    # -- admission ----------------------------------------------------------------------------------------------

    def on_admit(
        self,
        backend: ModelBackend,
        seq_id: int,
        tokens: Sequence[int],
        parent: CacheKey | None,
        *,
        fold: bool,
        save_at: Sequence[int] = (),
    ) -> Admission:
        """Restore the most of ``tokens`` into the empty ``seq_id`` and set the prompt's save points: the policy's
        cold point and ``save_at`` (a client's cache breakpoints, as token positions; those the restore covers,
        shorter than the policy's ``min_tokens``, or within ``MERGE_TOKENS`` below a later save point, are
        dropped). With ``fold`` the last prompt token rides in the final prefill chunk: a save point one short of
        the prompt becomes the whole prompt, saved once its first token is out."""
        hit = self.restore(backend, seq_id, tokens, parent)
        n = len(tokens)
        points: dict[int, SaveReason] = {}
        for p in save_at:
            if hit.prefix_len < p < n and p >= max(self.policy.min_tokens, 1):
                points[p] = SaveReason.MANUAL
        cold_point = self._cold_point(n, hit.prefix_len)
        if cold_point is not None:
            points[cold_point] = SaveReason.COLD
        if fold and n - 1 in points:
            points[n] = points.pop(n - 1)
        ordered = sorted(points.items())
        # a breakpoint just short of a later save point of the same prompt (the newest message's, a few tokens
        # before the prompt's own row) would be a second copy of nearly the same state: the later row serves it
        ordered = [
            (p, why)
            for i, (p, why) in enumerate(ordered)
            if why is not SaveReason.MANUAL or i + 1 == len(ordered) or ordered[i + 1][0] - p > MERGE_TOKENS
        ]
        cache = SeqCache(True, last_save=hit.prefix_len, later=ordered)
        cache.next_point()
        return Admission(hit, cache)

    def restore(self, backend: ModelBackend, seq_id: int, tokens: Sequence[int], parent: CacheKey | None) -> CacheHit:
        """Restore the most of ``tokens`` the cache can give (at most ``len(tokens) - 1``) into an empty ``seq_id``;
        returns what was found. On any failure the sequence is left empty (cold).

        Candidates: the longest stored row that is a prefix of ``tokens``, and, when a longer stored row has a longer
        common prefix with ``tokens`` than that (the same document followed by another question), that row, restored
        and then cut back to the common prefix. Cutting back fails on caches that already dropped what the cut-back
        sequence would need (sliding-window caches without ``swa_full``); the prefix row is tried next.
        """
        limit = len(tokens) - 1
        store = self.store
        prefix = store.longest_prefix(self.namespace, tokens, max_tokens=limit) if limit > 0 else None
        short = limit > 0 and (prefix is None or prefix.n_tokens < limit)
        shared = store.deepest_shared(self.namespace, tokens, max_tokens=limit) if short else None
        candidates = [c for c in (shared,) if c is not None and c.n_tokens > (prefix.n_tokens if prefix else 0)]
        candidates += [prefix] if prefix is not None else []
        self.counters.incr("query_tokens", len(tokens))
        found = COLD
        for hit in candidates:
            n, tier = self._restore_row(backend, seq_id, tokens, hit.key, n=hit.n_tokens, limit=limit)
            if n:
                found = CacheHit(
                    HitKind.EXACT if n == limit else HitKind.PARTIAL, n, resumed=hit.key == parent, tier=tier
                )
                self.counters.incr("restored_tokens", n)
                if tier is not None:
                    store.record_use(hit.key, tier, n)
                break
        self.counters.record_hit(found.kind, resumed=found.resumed)
        return found if found.prefix_len >= limit else self._nearest(found, tokens, shared or prefix)

    def _nearest(self, found: CacheHit, tokens: Sequence[int], near: PrefixHit | None) -> CacheHit:
        """``found`` with the cached row nearest ``tokens`` (why no more was restored): ``near``, the row the
        lookups found sharing the most, else the best first-block match among recent rows (a prompt that left
        every row inside its first block)."""
        if near is None:
            near = self.store.nearest(self.namespace, tokens)
        row = self.store.tokens_of(near.key) if near is not None else None
        if near is None or row is None:
            return found
        at = near.n_tokens
        nxt = tuple(int(t) for t in row[at : at + CONTEXT_TOKENS])
        return dataclasses.replace(found, row_tokens=len(row), shared_tokens=at, row_next=nxt)

    def _restore_row(
        self, backend: ModelBackend, seq_id: int, tokens: Sequence[int], key: CacheKey, *, n: int, limit: int
    ) -> tuple[int, str | None]:
        """Restore a row whose first ``n`` tokens (``n <= limit``, as the index found them) equal ``tokens[:n]`` and
        keep exactly those. Returns ``n`` and the tier that served the row, or 0 on failure (the sequence is then
        empty)."""
        row = self.store.load_from(key)
        if row is None:  # dropped between the index walk and the load
            return 0, None
        meta, payload, tier = row
        return self._set_row(backend, seq_id, tokens, (meta, payload), key=key, n=n, limit=limit), tier

    def _set_row(
        self,
        backend: ModelBackend,
        seq_id: int,
        tokens: Sequence[int],
        row: tuple[RowMeta, memoryview],
        *,
        key: CacheKey,
        n: int,
        limit: int,
    ) -> int:
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
        hit = self.store.longest_prefix(self.namespace, tokens)
        return hit.n_tokens if hit is not None else 0

    # -- saves --------------------------------------------------------------------------------------------------

    def _cold_point(self, n_prompt: int, restored: int) -> int | None:
        """Where to save a prompt while prefilling it, or None (vetoed, or already covered by the restore)."""
        point = cold_save_point(self.policy, n_prompt)
        if isinstance(point, Veto):
            self.counters.record_veto(point)
            return None
        return point if point > restored else None

    def on_step(self, backend: ModelBackend, seq: CachedSequence) -> None:
        """A step fed ``seq``: its cold save when it reached the save point, or a continued save when one is due."""
        c = seq.cache
        if not c.enabled:
            return
        while c.cold_point is not None and seq.fed > c.cold_point:  # (chunks end at save points; never skip one)
            c.next_point()
        if c.cold_point is not None and seq.fed == c.cold_point:
            self._save(backend, seq.seq_id, seq.tokens[: seq.fed], c.reason)
            c.last_save = seq.fed
            c.next_point()
        elif (
            seq.fed > seq.n_prompt
            and not seq.ended
            and allows_continued_save(self.policy, seq.fed, seq.fed - c.last_save) is None
        ):
            self._save(backend, seq.seq_id, seq.tokens[: seq.fed], SaveReason.CONTINUED)
            c.last_save = seq.fed

    def saves_after_first_token(self, seq: CachedSequence) -> bool:
        """Whether this step's save of ``seq`` waits until its first token is out: a folded prompt's cold row,
        which is the whole prompt (its copy then stays off the time to first token)."""
        c = seq.cache
        return c.enabled and c.cold_point == seq.n_prompt == seq.fed

    def on_finish(self, seq: CachedSequence) -> FinishPlan:
        """The reply of ``seq`` ended (its tokens include the last one sampled). Its finish row is saved if the
        policy allows; when its last token is not committed yet the sequence must close first, and the row is
        reserved until then."""
        c = seq.cache
        if not c.enabled:
            return FinishPlan(save=False, close_first=False)
        veto = allows_final_save(self.policy, len(seq.tokens))
        if veto is not None:
            self.counters.record_veto(veto)
            return FinishPlan(save=False, close_first=False)
        if seq.fed >= len(seq.tokens):
            return FinishPlan(save=True, close_first=False)
        c.reserved = self.store.reserve(self.namespace, seq.tokens)
        if c.reserved:
            key = self.key(seq.tokens)
            self._finishing[key] = (tuple(seq.tokens), seq.n_prompt)
        return FinishPlan(save=True, close_first=True)

    def on_announce(self, context: Sequence[int]) -> CacheKey:
        """The finish key of the context a reply leaves (remembered with its tokens, for ``parent_key``)."""
        key = self.key(context)
        self.remember(key, context)
        return key

    def on_close(self, backend: ModelBackend, seq: CachedSequence, *, save: bool) -> None:
        """``seq`` is being freed (its state still in the context): write its finish row when ``save`` and it holds
        more than its last save; else give up its reservation."""
        c = seq.cache
        saved = False
        if c.enabled and save and seq.fed > c.last_save:
            context = seq.tokens[: seq.fed]
            self._save(backend, seq.seq_id, context, SaveReason.FINISH)  # fills the reservation, if held
            self._finishing[self.key(context)] = (tuple(context), seq.n_prompt)
            saved = True
        if c.reserved and not saved:
            self.store.release(self.namespace, seq.tokens)
        c.reserved = False

    def on_fail(self, seq: CachedSequence) -> None:
        """``seq`` failed or its worker stopped: its finish row, if reserved, will not be written."""
        if seq.cache.reserved:
            seq.cache.reserved = False
            self.store.release(self.namespace, seq.tokens)

    def save_live(
        self, backend: ModelBackend, seqs: Sequence[CachedSequence], reason: SaveReason, timeout_s: float
    ) -> int:
        """Evict and shutdown saves: publish the committed state of each sequence (policy allowing) before
        returning, each bounded by ``timeout_s``; returns the rows written."""
        saved = 0
        for seq in seqs:
            c = seq.cache
            if not c.enabled or seq.fed <= c.last_save:
                continue
            veto = allows_final_save(self.policy, seq.fed)
            if veto is not None:
                self.counters.record_veto(veto)
                continue
            state = _state_of(backend, seq.seq_id)
            saved += self.store.save_sync(self.namespace, seq.tokens[: seq.fed], state, reason, timeout_s)
            c.last_save = seq.fed
        return saved

    def _save(self, backend: ModelBackend, seq_id: int, tokens: Sequence[int], reason: SaveReason) -> None:
        """Hand the sequence's state to the store's writer; its copy is read (on this thread) only when the store
        wants the row (a reserved row always)."""
        self.store.save(self.namespace, tokens, _state_of(backend, seq_id), reason)


def _state_of(backend: ModelBackend, seq_id: int) -> Callable[[], memoryview]:
    return lambda: backend.state_get(seq_id)
