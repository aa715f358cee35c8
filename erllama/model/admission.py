"""Admission: a queued request becomes a running one — its context worked out and checked, a sequence taken, the
longest cached prefix restored, its sampler set — or is answered with its error, or parked.

A request is *parked* (put back at the head of the queue, with its tokens) while a row it needs is being written:
its ``parent_key``'s finish row, or the row of a reply it continues (the next turn of a chat, sent the moment the
reply ended: that reply is closed at once and its row handed to the writer, rather than computing the reply's tokens
again). It waits at most ``session_resume_wait_ms``; the row's save wakes the worker when it settles.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from erllama.errors import InvalidInputError, PromptTooLongError, TokenIdError
from erllama.model.apply import Applier
from erllama.model.backend import ModelBackend
from erllama.model.cachelink import COLD, CacheHit, CacheLink, SeqCache
from erllama.model.delivery import Outbox
from erllama.model.events import AdmittedEvent, DoneEvent, ErrorEvent, FinishReason
from erllama.model.sequences import Running, SeqTable, Waiting, reply_room
from erllama.model.stop import StopMatcher
from erllama.text import Detokenizer

__all__ = ["Admitter"]


class Admitter:
    """Admits one worker's requests (on its thread). ``wake`` is called from a writer thread when a row a parked
    request waits for is settled."""

    def __init__(
        self,
        *,
        backend: ModelBackend,
        link: CacheLink | None,
        table: SeqTable,
        outbox: Outbox,
        applier: Applier,
        wake: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.link = link
        self.table = table
        self.outbox = outbox
        self.applier = applier
        self._wake = wake
        self.last_hit: CacheHit | None = None

    def admit(self, w: Waiting, parked: list[Waiting]) -> None:
        """Admit ``w``, answer it (cancelled, or failed a check), or append it to ``parked``. Raises what fails
        while it holds a sequence (the caller answers it with :meth:`reject`) and WorkerFault."""
        if w.handle.cancelled:
            self.outbox.emit(w.handle, DoneEvent(FinishReason.CANCELLED, (), "", 0, 0.0, 0.0))
            return
        tokens = self._context_of(w, parked)
        if tokens is None:
            return
        if self._awaits_reply_row(w, tokens):
            parked.append(w)
            return
        backend, request = self.backend, w.request
        n_ctx, n_vocab = backend.info.n_ctx_seq, backend.info.n_vocab
        if min(tokens) < 0 or max(tokens) >= n_vocab:
            bad = next(t for t in tokens if not 0 <= t < n_vocab)
            self._refuse(w, TokenIdError(bad, n_vocab))
            return
        max_tokens = reply_room(len(tokens), request.max_tokens, n_ctx, request.fit_context)
        if max_tokens is None:
            self._refuse(w, PromptTooLongError(len(tokens), None if request.fit_context else request.max_tokens, n_ctx))
            return
        t_start = time.perf_counter()  # the restore counts towards time-to-first-token
        seq_id = w.seq_id = self.table.free.take()
        backend.seq_truncate(seq_id, 0)
        fold = backend.info.last_token_foldable
        hit, cache = COLD, SeqCache(enabled=False)
        if self.link is not None and request.use_cache:
            points = self._save_points(w, tokens)
            admission = self.link.on_admit(backend, seq_id, tokens, request.parent_key, fold=fold, save_at=points)
            hit, cache = admission.hit, admission.cache
        backend.set_sampler(seq_id, request.sampling)
        r = Running(
            w.handle,
            seq_id,
            tokens,
            len(tokens),
            max_tokens,
            Detokenizer(backend),
            StopMatcher(request.stop) if request.stop else None,
            hit,
            cache,
            fed=hit.prefix_len,
            fold=fold,
            t_start=t_start,
            logprobs=request.logprobs,
        )
        self.table.add(r)
        w.seq_id = None
        self.last_hit = hit
        report = hit.report(tokens) if self.link is not None and request.use_cache else None
        self.outbox.emit(w.handle, AdmittedEvent(len(tokens), hit.prefix_len, max_tokens, hit.kind, report))

    def reject(self, w: Waiting, exc: Exception) -> None:
        """``w`` failed while being admitted: answer it, and give back the sequence it took."""
        seq_id, w.seq_id = w.seq_id, None
        if seq_id is not None:
            r = self.table.running.get(seq_id)
            if r is not None and r.handle is w.handle:
                self.table.remove(r)
            self.applier.free_seq(seq_id)
        self.applier.report(w.handle, exc)

    def _refuse(self, w: Waiting, exc: Exception) -> None:
        self.outbox.emit(w.handle, ErrorEvent(exc))

    def _save_points(self, w: Waiting, context: list[int]) -> list[int]:
        """The request's ``save_at`` as positions in its context: for a text prompt, the tokens the text before
        each offset shares with the prompt's (a token may straddle the offset: the point is then before it)."""
        r = w.request
        if not r.save_at or w.tokens is None:
            return []
        start = len(context) - len(w.tokens)  # after a parent's tokens
        if not isinstance(r.prompt, str):
            return [start + p for p in r.save_at]
        points = []
        for offset in r.save_at:
            head = self.backend.tokenize(r.prompt[:offset], add_special=r.parent_key is None, parse_special=True)
            n = next((i for i, (a, b) in enumerate(zip(head, w.tokens, strict=False)) if a != b), len(head))
            points.append(start + n)
        return points

    def _context_of(self, w: Waiting, parked: list[Waiting]) -> list[int] | None:
        """The request's whole context: its prompt, after its parent's tokens for a parent_key continuation."""
        r, backend = w.request, self.backend
        if w.tokens is None and not isinstance(r.prompt, str):
            w.tokens = list(r.prompt)
        if w.tokens is None:
            assert isinstance(r.prompt, str)
            n_ctx = backend.info.n_ctx_seq
            reserved = r.max_tokens if r.max_tokens is not None and not r.fit_context else 0
            room = n_ctx - reserved
            if backend.info.max_token_bytes and len(r.prompt) > room * backend.info.max_token_bytes:
                # at least that many bytes (a character is one or more), so more tokens than fit: not tokenized
                at_least = len(r.prompt) // backend.info.max_token_bytes
                self._refuse(w, PromptTooLongError(at_least, reserved or None, n_ctx, at_least=True))
                return None
            try:
                w.tokens = backend.tokenize(r.prompt, add_special=r.parent_key is None, parse_special=True)
            except InvalidInputError as exc:
                self._refuse(w, exc)
                return None
            if not w.tokens:
                self._refuse(w, InvalidInputError("the prompt tokenizes to nothing"))
                return None
        if r.parent_key is None:
            return w.tokens
        link = self.link
        if link is None:
            self._refuse(w, InvalidInputError("parent_key needs a model loaded with a cache"))
            return None
        if time.monotonic() < w.deadline and link.parent_pending(r.parent_key, self._wake):
            parked.append(w)  # its parent's finish save is still being written
            return None
        parent = link.parent_tokens(r.parent_key)
        if parent is None:
            self._refuse(w, InvalidInputError("unknown parent_key: no such finish key in this namespace"))
            return None
        return [*parent, *w.tokens]

    def _awaits_reply_row(self, w: Waiting, tokens: list[int]) -> bool:
        """Whether the request continues a reply whose finish row is not restorable yet: it then waits for the row,
        up to its deadline. A reply still closing is closed at once, its row handed to the writer."""
        if self.link is None:
            return False
        context = self.link.continued_reply(tokens, self._wake)
        if context is None:
            return False
        self.applier.close([r for r in self.table.running.values() if r.ended and tuple(r.tokens) == context])
        return time.monotonic() < w.deadline
