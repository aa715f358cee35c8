"""Applying a step's output, in one place (vLLM's ``update_from_output``): the :class:`Applier` turns the rows a
decode produced into tokens and events, ends replies, saves and frees sequences.

For every sequence of a step, in order: its tokens count as fed; the cache's step saves (cold, continued); a
sampled token is appended, checked against end-of-generation, stop texts and ``max_tokens``, detokenized and sent
(with its logprobs when asked). A reply that ends is announced at once (``DoneEvent`` with its finish key); its
sequence closes — last token committed, finish row saved, sequence freed — right away when the token is already in
the KV cache, else with a later step (:mod:`erllama.model.planner`, rule 2), its row reserved meanwhile.

Whatever fails for one sequence (its sampler, its stop text, its save) fails that request alone: it is answered with
the error, its sequence freed, and the worker goes on. A decode that fails is the worker's fault
(:class:`WorkerFault`): the worker crashes and its supervisor restarts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from erllama.errors import ErllamaError, RequestFailedError
from erllama.model.backend import DecodeItem, ModelBackend, token_logprob
from erllama.model.cachelink import CacheLink, FinishPlan
from erllama.model.delivery import FlushPoint, Outbox, RequestHandle
from erllama.model.events import DoneEvent, ErrorEvent, FinishReason, TokenEvent
from erllama.model.planner import StepPlan
from erllama.model.sequences import Running, SeqTable

__all__ = ["Applier", "WorkerFault"]

log = logging.getLogger("erllama.worker")

_NO_SAVE = FinishPlan(save=False, close_first=False)


class WorkerFault(Exception):
    """Wraps a failure of the worker's own work (a decode) that happened while one request was being handled, so
    that it crashes the worker instead of being charged to that request."""


class Applier:
    """Applies steps' outputs to the running requests of one worker (on its thread)."""

    def __init__(
        self, backend: ModelBackend, link: CacheLink | None, table: SeqTable, outbox: Outbox, *, name: str
    ) -> None:
        self.backend = backend
        self.link = link
        self.table = table
        self.outbox = outbox
        self.name = name
        self.request_failures = 0  # requests answered with an error of their own (the worker went on)

    def apply(self, plan: StepPlan[Running], rows: Sequence[int | None]) -> None:
        """Apply the output of ``plan``'s decode: ``rows[i]`` is the logits row of ``plan.items[i]`` (or None)."""
        link = self.link
        # The step's tokens, picked together (one pass over the logits). Rows that end their request unsampled are
        # left out: closing ones, and those that reached max_tokens (a prefill-only request).
        picks = [
            (r.seq_id, row)
            for r, row in zip(plan.owners, rows, strict=True)
            if row is not None and not r.ended and r.n_generated < r.max_tokens
        ]
        sampled, failed = self._sample(picks)
        closed: list[Running] = []
        firsts = False
        for r, item, row in zip(plan.owners, plan.items, rows, strict=True):
            r.fed += len(item.tokens)
            try:
                if r.seq_id in failed:
                    raise failed[r.seq_id]
                after_first = link is not None and link.saves_after_first_token(r)
                if link is not None and not after_first:
                    link.on_step(self.backend, r)
                if r.ended:
                    closed.append(r)  # its finish row is copied once the others' tokens are handled
                elif row is not None:
                    firsts = firsts or not r.t_first
                    self._sampled(r, row, sampled.get(r.seq_id))
                if after_first and link is not None and self.table.running.get(r.seq_id) is r:
                    self.outbox.flush(FlushPoint.FIRST_TOKEN)  # the first token goes out before the prompt's row
                    link.on_step(self.backend, r)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                self.fail(r, exc)
        if closed and (firsts or all(r.ended for r in self.table.running.values())):
            # Tokens go out before finish rows are copied when they are first tokens (off their time to first token)
            # or when no sequence is left generating (the copies then hold up no one's next token).
            self.outbox.flush(FlushPoint.FINISH_ROWS)
        for r in closed:
            try:
                self.complete(r, r.closing or FinishReason.STOP, save=True)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                self.fail(r, exc)
        self.table.count_pending()

    def _sample(self, picks: list[tuple[int, int]]) -> tuple[dict[int, int], dict[int, Exception]]:
        """Sample every pick in one pass; when that fails, row by row, so only the rows that fail (a sampler a
        request's parameters broke) are charged with it. Returns (seq_id -> token, seq_id -> error)."""
        if not picks:
            return {}, {}
        try:
            return dict(zip((s for s, _ in picks), self.backend.sample_rows(picks), strict=True)), {}
        except Exception:  # noqa: BLE001 - found out row by row below
            pass
        sampled: dict[int, int] = {}
        failed: dict[int, Exception] = {}
        for pick in picks:
            try:
                sampled[pick[0]] = self.backend.sample_rows([pick])[0]
            except Exception as exc:  # noqa: BLE001 - that request's failure
                failed[pick[0]] = exc
        return sampled, failed

    def _sampled(self, r: Running, row: int, token: int | None) -> None:
        """``token``: the one sampled from ``row``; None when the request was not sampled, having reached max_tokens
        (max_tokens == 0: prefill only)."""
        if token is None:
            self.finish(r, FinishReason.LENGTH)
            return
        backend = self.backend
        logits = backend.logits(row) if r.logprobs is not None else None
        if not r.t_first:
            r.t_first = time.perf_counter()
        r.tokens.append(token)
        if token in backend.info.eog_tokens:
            self.finish(r, FinishReason.STOP)
            return
        r.n_generated += 1
        text = r.detok.feed(token)
        if r.stops is not None:
            text = r.stops.feed(text)
        r.text.append(text)
        lp = None
        if logits is not None and r.logprobs is not None:
            lp = token_logprob(logits, token, r.logprobs, backend.token_to_piece)
        self.outbox.emit(r.handle, TokenEvent(token, text, lp))
        if r.stops is not None and r.stops.matched is not None:
            self.finish(r, FinishReason.STOP)
        elif r.n_generated >= r.max_tokens:
            self.finish(r, FinishReason.LENGTH)

    # -- the end of a request -------------------------------------------------------------------------------------

    def finish(self, r: Running, reason: FinishReason) -> None:
        """The reply is over: announce it. When its last token is not committed yet (and its finish row is to be
        saved), the sequence closes with a later step; else now."""
        plan = self.link.on_finish(r) if self.link is not None else _NO_SAVE
        if plan.close_first:
            r.closing = reason
            r.t_closing = time.monotonic()
            self._announce(r, reason, committed=len(r.tokens))
            return
        self.complete(r, reason, save=plan.save)

    def close(self, closing: Sequence[Running]) -> None:
        """Close these ended sequences now, in a decode of their own (not waiting for a step to take them)."""
        if not closing:
            return
        self.outbox.flush(FlushPoint.CLOSE)
        try:
            self.backend.decode([DecodeItem(r.seq_id, [r.tokens[r.fed]], logits=False) for r in closing])
        except Exception as exc:  # a failed decode is the worker's fault, even when a request's admission ran it
            raise WorkerFault from exc
        for r in closing:
            r.fed += 1
            self.complete(r, r.closing or FinishReason.STOP, save=True)

    def complete(self, r: Running, reason: FinishReason, *, save: bool) -> None:
        """Free the sequence, after saving its context when ``save``; announce the end unless it went out when the
        sequence began closing."""
        try:
            if self.link is not None:
                self.link.on_close(self.backend, r, save=save and reason is not FinishReason.CANCELLED)
        finally:
            self._free(r)
        if not r.ended:  # announced after the sequence is free: whoever sees the end can count on it
            self._announce(r, reason, committed=r.fed)

    def fail(self, r: Running, exc: Exception) -> None:
        """A running request failed on its own (its sampler, its stop text, its save ...): answer it alone, free its
        sequence; the other sequences and the worker go on."""
        self._free(r)
        if self.link is not None:
            try:
                self.link.on_fail(r)
            except Exception:
                log.exception("worker %s: releasing a failed request's reservation", self.name)
        if not r.ended:
            self.report(r.handle, exc)
        else:  # its end went out already; only its finish row is lost
            log.warning("worker %s: closing request %d failed: %r", self.name, r.handle.id, exc)

    def report(self, handle: RequestHandle, exc: Exception) -> None:
        """Answer a request with its own failure (an error outside erllama's tree becomes RequestFailedError)."""
        self.request_failures += 1
        if isinstance(exc, ErllamaError):
            error: Exception = exc
        else:
            log.error("worker %s: request %d failed", self.name, handle.id, exc_info=exc)
            error = RequestFailedError(f"the request failed inside the model worker ({type(exc).__name__})")
        self.outbox.emit(handle, ErrorEvent(error))

    def free_seq(self, seq_id: int) -> None:
        """Empty a sequence and give its id back."""
        try:
            self.backend.seq_truncate(seq_id, 0)
        finally:
            self.table.free.give(seq_id)

    def _free(self, r: Running) -> None:
        if self.table.remove(r):
            self.free_seq(r.seq_id)

    def _announce(self, r: Running, reason: FinishReason, *, committed: int) -> None:
        """Send the request's end: the final DoneEvent (after a last text event for held-back stop text).
        ``committed``: how many of its tokens the sequence holds, or will once it has closed."""
        finish_key = None
        if self.link is not None and r.cache.enabled and reason is not FinishReason.CANCELLED:
            finish_key = self.link.on_announce(r.tokens[:committed])
        # Bytes of a character the reply was cut inside are dropped: the reply ends before it, streamed or not.
        r.detok.reset()
        tail = r.stops.flush() if r.stops is not None else ""
        if tail:
            r.text.append(tail)
        stop_sequence = r.stops.matched if r.stops is not None else None
        if stop_sequence is not None and reason is FinishReason.LENGTH:
            reason = FinishReason.STOP  # the last tokens completed a stop sequence
        now = time.perf_counter()
        first = r.t_first or now
        done = DoneEvent(
            reason,
            tuple(r.tokens[r.n_prompt : r.n_prompt + r.n_generated]),
            "".join(r.text),
            r.n_prompt,
            first - r.t_start,
            now - first,
            stop_sequence,
            context_tokens=tuple(r.tokens),
            committed_tokens=committed,
            finish_key=finish_key,
            cache_hit=r.hit.kind,
            restored_tokens=r.hit.prefix_len,
            prefilled_tokens=min(committed, r.n_prompt) - r.hit.prefix_len,
            cache=r.hit.report(r.tokens, r.n_prompt) if self.link is not None else None,
        )
        if tail:
            self.outbox.emit(r.handle, TokenEvent(-1, tail))  # so that the streamed text adds up to the reply
        self.outbox.emit(r.handle, done)
