"""``ModelWorker``: one thread that owns a backend for its whole life and serves requests by continuous batching.

The loop runs in phases, every pass::

    run_calls → admit → cancel → [gather] → plan → flush → decode → apply (+ saves)      (idle: flush, wait)

* **run_calls** — work other threads asked to run on this thread (tokenize, embed, verify, adapters, live saves);
* **admit** — queued requests become running ones while sequences are free (:mod:`erllama.model.admission`);
* **cancel** — cancelled requests are freed and answered;
* **gather** — before a step that only starts prefills, wait a moment for requests arriving with them;
* **plan** — :func:`~erllama.model.planner.plan_step` picks the step's tokens (a pure function; its rules and
  their constants in :class:`~erllama.model.batching.BatchingConfig`);
* **flush** — the outbox wakes the consumers of the last step's events, as the decode starts without the GIL;
* **decode** — one ``llama_decode``;
* **apply** — :class:`~erllama.model.apply.Applier` samples, streams, ends replies, saves through the
  :class:`~erllama.model.cachelink.CacheLink` and frees sequences.

Other threads only go through the :class:`~erllama.model.inbox.Inbox` (requests, calls, stop) and set cancel flags;
a cancel is observed at the next pass, i.e. within one token or one prefill chunk, and frees the sequence. Phase,
queue depth and in-flight count are plain attributes published by the worker, so readers never wait on it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from erllama.cache.kvc import SaveReason
from erllama.errors import WorkerStoppedError
from erllama.model.adapters import AdapterSync
from erllama.model.admission import Admitter
from erllama.model.apply import Applier, WorkerFault
from erllama.model.backend import BackendInfo, ModelBackend
from erllama.model.cachelink import CacheHit, CacheLink, namespace_for
from erllama.model.config import WorkerConfig
from erllama.model.delivery import FlushPoint, Outbox, RequestHandle
from erllama.model.events import FinishReason, Phase
from erllama.model.inbox import Inbox
from erllama.model.planner import PrefillCost, close_grace_s, gather_has_room, gather_wait_s, plan_step
from erllama.model.request import GenerateRequest
from erllama.model.sequences import SeqTable, Waiting

__all__ = ["ModelWorker"]

log = logging.getLogger("erllama.worker")

_T = TypeVar("_T")


class _Parts:
    """What the worker builds on its thread once the backend is loaded."""

    def __init__(self, worker: ModelWorker, backend: ModelBackend, link: CacheLink | None) -> None:
        self.backend = backend
        self.table = SeqTable.of(backend.info.n_seq_max)
        self.outbox = Outbox()
        self.applier = Applier(backend, link, self.table, self.outbox, name=worker.name)
        self.admitter = Admitter(
            backend=backend,
            link=link,
            table=self.table,
            outbox=self.outbox,
            applier=self.applier,
            wake=worker.inbox.nudge,
        )
        self.cost = PrefillCost(worker.config.batching)


class ModelWorker:
    """Owns one backend on one thread; call :meth:`submit` from anywhere.

    With a ``cache``, admission restores the longest stored prefix of each request and the worker saves states per
    ``policy`` (cold, continued, finish; a shutdown save of live sequences when it stops).
    """

    def __init__(
        self,
        backend_factory: Callable[[], ModelBackend],
        config: WorkerConfig | None = None,
        *,
        name: str = "model",
        on_exit: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config or WorkerConfig()
        self.inbox = Inbox()
        self.crash: BaseException | None = None
        self.link: CacheLink | None = None  # set on the worker thread once the backend is loaded
        self.info: BackendInfo | None = None
        self.phase = Phase.IDLE
        self.ticks = 0
        self._factory = backend_factory
        self._on_exit = on_exit
        self._adapters = AdapterSync(self.config.adapters, self.config.salt) if self.config.adapters else None
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._parts: _Parts | None = None  # worker thread only
        self._thread = threading.Thread(target=self._main, name=f"erllama-worker-{name}", daemon=True)

    # -- caller side ----------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the thread and wait until the backend is loaded on it (re-raising a load failure)."""
        self._thread.start()
        self._ready.wait(timeout_s)
        if self._startup_error is not None:
            raise self._startup_error

    @property
    def queue_depth(self) -> int:
        return len(self.inbox)

    @property
    def in_flight(self) -> int:
        return self._parts.table.in_flight if self._parts is not None else 0

    @property
    def pending_len(self) -> int:
        """Prompt tokens still to prefill over the running requests."""
        return self._parts.table.pending_len if self._parts is not None else 0

    @property
    def kv_used(self) -> int:
        """Context tokens the running requests hold in the KV cache (as of the last step)."""
        return self._parts.table.kv_used if self._parts is not None else 0

    @property
    def last_hit(self) -> CacheHit | None:
        return self._parts.admitter.last_hit if self._parts is not None else None

    @property
    def request_failures(self) -> int:
        """Requests answered with an error of their own (the worker went on)."""
        return self._parts.applier.request_failures if self._parts is not None else 0

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.inbox.stopped

    def submit(self, request: GenerateRequest) -> RequestHandle:
        """Queue a request; events arrive on the returned handle: an AdmittedEvent once it passed its checks and
        holds a sequence (or an ErrorEvent), then TokenEvents and the final DoneEvent or ErrorEvent. A prompt
        that leaves no room in the context is refused (PromptTooLongError); see :class:`GenerateRequest`."""
        handle = RequestHandle(next(self._ids))
        deadline = time.monotonic() + self.config.policy.session_resume_wait_ms / 1000.0
        if not self.inbox.put(Waiting(handle, request, deadline), running=self._thread.is_alive()):
            handle.fail(WorkerStoppedError(f"worker {self.name} is not running"))
        return handle

    def call(self, fn: Callable[[ModelBackend], _T], timeout_s: float | None = 60.0) -> _T:
        """Run ``fn(backend)`` on the worker thread between two steps and return its result (or raise its error)."""
        result: _T = self._call(fn, False, timeout_s)
        return result

    def call_with_seq(self, fn: Callable[[ModelBackend, int], _T], timeout_s: float | None = 60.0) -> _T:
        """Like :meth:`call`, with an empty sequence lent to ``fn`` (waits for one to be free; emptied after)."""
        result: _T = self._call(fn, True, timeout_s)
        return result

    def _call(self, fn: Callable[..., Any], with_seq: bool, timeout_s: float | None) -> Any:
        future = self.inbox.call(fn, with_seq=with_seq, running=self._thread.is_alive())
        if future is None:
            raise WorkerStoppedError(f"worker {self.name} is not running")
        return future.result(timeout_s)

    def reapply_adapters(self, timeout_s: float = 60.0) -> None:
        """Load / detach / rescale adapters to match the adapter provider (between two steps)."""
        self.call(self._apply_adapters, timeout_s)

    def save_live(self, reason: SaveReason, timeout_s: float = 10.0) -> int:
        """Save the committed state of every running sequence now (evict / shutdown saves); returns rows written."""
        return self.call(lambda backend: self._save_live(reason, timeout_s), timeout_s + 5.0)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current step, shutdown-save and fail what is left, close the backend on its own thread."""
        self.inbox.stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- worker thread: lifecycle ----------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            backend = self._factory()
            self.info = backend.info
            if self.config.cache is not None:
                ns = namespace_for(backend.info, salt=self.config.salt)
                self.link = CacheLink(self.config.cache, self.config.policy, ns)
            parts = self._parts = _Parts(self, backend, self.link)
            if self._adapters is not None:
                try:
                    self._apply_adapters(backend)
                except BaseException:
                    backend.close()
                    raise
        except Exception as exc:  # noqa: BLE001 - handed to start(), which re-raises it on the caller's thread
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(parts)
        except Exception as exc:
            log.exception("worker %s crashed", self.name)
            self.crash = exc
            # its requests learn that the worker died, not its internals (a raw OSError names paths): the cause is
            # chained for the log and for callers in this process
            stopped = WorkerStoppedError(f"the worker of model {self.name} crashed ({type(exc).__name__})")
            stopped.__cause__ = exc
            self._fail_all(parts, stopped)
        finally:
            self.inbox.stop()  # refuse new requests before draining the inbox
            if self.crash is None:
                self._shutdown_save()
            self._fail_all(parts, WorkerStoppedError(f"worker {self.name} stopped"))
            self.phase = Phase.IDLE
            try:
                backend.close()
            finally:
                if self._on_exit is not None:
                    self._on_exit(self.crash)

    def _apply_adapters(self, backend: ModelBackend) -> None:
        if self._adapters is not None:
            running = self._parts.table.running.values() if self._parts is not None else ()
            self._adapters.apply(backend, self.link, [r.cache for r in running])

    def _save_live(self, reason: SaveReason, timeout_s: float) -> int:
        parts = self._parts
        if self.link is None or parts is None:
            return 0
        return self.link.save_live(parts.backend, list(parts.table.running.values()), reason, timeout_s)

    def _shutdown_save(self) -> None:
        try:
            self._save_live(SaveReason.SHUTDOWN, self.config.shutdown_save_timeout_s)
        except Exception:  # a failed shutdown save must not keep the backend from being freed
            log.exception("worker %s: shutdown save failed", self.name)

    def _fail_all(self, parts: _Parts, exc: BaseException) -> None:
        for r in parts.table.running.values():
            if not r.ended:
                r.handle.fail(exc)
            elif self.link is not None:
                self.link.on_fail(r)  # its end went out already; its finish row will not be written
        parts.table.running.clear()
        parts.table.in_flight = parts.table.pending_len = 0
        waiting, futures = self.inbox.drain()
        for w in waiting:
            w.handle.fail(exc)
        for future in futures:
            future.set_exception(WorkerStoppedError(f"worker {self.name} stopped"))

    # -- worker thread: the loop -------------------------------------------------------------------------------------

    def _loop(self, parts: _Parts) -> None:
        running = parts.table.running
        try:
            while not self.inbox.stopped:
                self._run_calls(parts)
                parked = self._admit(parts)
                self._cancel(parts)
                if running:
                    if not parked:
                        self._gather(parts)
                    if not self._close_grace(parts):
                        self._step(parts)
                    continue
                parts.outbox.flush(FlushPoint.IDLE)
                self.phase = Phase.IDLE
                self.inbox.wait_idle(self.config.idle_wait_s, parked=parked)
            parts.applier.close([r for r in running.values() if r.ended])
        finally:
            parts.outbox.flush(FlushPoint.IDLE)

    def _run_calls(self, parts: _Parts) -> None:
        while (call := self.inbox.next_call(parts.table.free)) is not None:
            fn, seq_fn, seq_id, future = call
            parts.outbox.flush(FlushPoint.CALL)  # a call may take a while
            try:
                if future.set_running_or_notify_cancel():
                    if seq_fn is not None:
                        parts.backend.seq_truncate(seq_id, 0)
                        future.set_result(seq_fn(parts.backend, seq_id))
                    elif fn is not None:
                        future.set_result(fn(parts.backend))
            except Exception as exc:  # noqa: BLE001 - the caller of call() gets it
                future.set_exception(exc)
            finally:
                if seq_fn is not None:
                    parts.applier.free_seq(seq_id)

    def _admit(self, parts: _Parts) -> bool:
        """Admit queued requests while sequences are free; True if a request is parked (waiting for a row being
        written). A request whose admission fails is answered with the error alone; the worker goes on."""
        parked: list[Waiting] = []
        try:
            while parts.table.free and (w := self.inbox.next_request()) is not None:
                try:
                    parts.admitter.admit(w, parked)
                except WorkerFault as fault:
                    parked.insert(0, w)  # back in the inbox: the crash fan-out answers it
                    raise fault.__cause__ or fault from None  # crash the worker: its supervisor restarts it
                except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                    parts.admitter.reject(w, exc)
                finally:
                    self.inbox.admitted()
        finally:
            if parked:  # (a crash too: what is parked must be in the inbox to be answered)
                self.inbox.park(parked)
        return bool(parked)

    def _cancel(self, parts: _Parts) -> None:
        for r in [r for r in parts.table.running.values() if r.handle.cancelled and not r.ended]:
            try:
                parts.applier.complete(r, FinishReason.CANCELLED, save=False)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                parts.applier.fail(r, exc)

    def _gather(self, parts: _Parts) -> None:
        """Dynamic batching (planner.gather_wait_s): admit requests arriving within the wait into this step."""
        table, n_batch, rules = parts.table, parts.backend.info.n_batch, self.config.batching
        seqs = list(table.running.values())
        wait = gather_wait_s(
            seqs, n_batch=n_batch, free_seqs=bool(table.free), s_per_token=parts.cost.s_per_token, rules=rules
        )
        deadline = time.perf_counter() + wait
        while wait > 0 and table.free and gather_has_room(seqs, n_batch=n_batch, rules=rules):
            if self.inbox.stopped or not self.inbox.wait_for_request(deadline) or self._admit(parts):
                return  # (admit: a request is parked, the row it needs is being written)
            seqs = list(table.running.values())

    def _close_grace(self, parts: _Parts) -> bool:
        """With only ended replies left to close, wait out the close grace for a new request (planner.close_grace_s),
        waking for it at once. True when it waited."""
        running = list(parts.table.running.values())
        left = close_grace_s(running, [r.t_closing for r in running], time.monotonic(), self.config.batching)
        if left <= 0:
            return False
        parts.outbox.flush(FlushPoint.IDLE)
        return self.inbox.wait_grace(left)

    def _step(self, parts: _Parts) -> None:
        """plan → flush → decode → apply."""
        table = parts.table
        rules = self.config.batching
        plan = plan_step(
            list(table.running.values()), n_batch=parts.backend.info.n_batch, free_seqs=bool(table.free), rules=rules
        )
        self.phase = plan.phase
        parts.outbox.flush(FlushPoint.DECODE)  # the last step's tokens go out: the loops run while this decode
        t0 = time.perf_counter()  # holds no GIL
        rows = parts.backend.decode(plan.items)
        parts.cost.record(plan.n_tokens, time.perf_counter() - t0)
        self.ticks += 1
        parts.applier.apply(plan, rows)
