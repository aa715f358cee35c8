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

Other threads only enqueue requests, read events and set cancel flags; a cancel is observed at the next pass, i.e.
within one token or one prefill chunk, and frees the sequence. Phase, queue depth and in-flight count are plain
attributes published by the worker, so readers never wait on it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from erllama.cache.kvc import SaveReason
from erllama.errors import WorkerStoppedError
from erllama.model.admission import Admitter
from erllama.model.apply import Applier, WorkerFault
from erllama.model.backend import BackendInfo, ModelBackend
from erllama.model.cachelink import CacheHit, CacheLink, namespace_for
from erllama.model.config import WorkerConfig
from erllama.model.delivery import FlushPoint, Outbox, RequestHandle
from erllama.model.events import (
    AdmittedEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    FinishReason,
    Phase,
    TokenEvent,
)
from erllama.model.planner import PrefillCost, close_grace_s, gather_has_room, gather_wait_s, plan_step
from erllama.model.request import GenerateRequest
from erllama.model.sequences import SeqTable, Waiting

__all__ = [
    "AdmittedEvent",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "FinishReason",
    "ModelWorker",
    "Phase",
    "RequestHandle",
    "TokenEvent",
]

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
            backend=backend, link=link, table=self.table, outbox=self.outbox, applier=self.applier, wake=worker._nudge
        )
        self.cost = PrefillCost(worker._batching)


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
        cfg = config or WorkerConfig()
        self.name = name
        self._on_exit = on_exit
        self.crash: BaseException | None = None
        self._factory = backend_factory
        self._config = cfg
        self._batching = cfg.batching
        self._adapter_handles: dict[str, object] = {}
        self._inbox: deque[Waiting] = deque()
        self._calls: deque[tuple[Callable[[ModelBackend], Any], Future[Any]]] = deque()
        self._seq_calls: deque[tuple[Callable[[ModelBackend, int], Any], Future[Any]]] = deque()
        self._wake = threading.Condition()
        self._nudged = False  # a row a parked request waits for settled (under _wake)
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._parts: _Parts | None = None  # worker thread only
        self._admitting: Waiting | None = None  # off the inbox, not running yet: answered too if the worker dies
        self.link: CacheLink | None = None  # set on the worker thread once the backend is loaded
        self.info: BackendInfo | None = None
        self.phase = Phase.IDLE
        self.ticks = 0
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
        return len(self._inbox)

    @property
    def in_flight(self) -> int:
        return self._parts.table.in_flight if self._parts is not None else 0

    @property
    def pending_len(self) -> int:
        """Prompt tokens still to prefill over the running requests."""
        return self._parts.table.pending_len if self._parts is not None else 0

    @property
    def last_hit(self) -> CacheHit | None:
        return self._parts.admitter.last_hit if self._parts is not None else None

    @property
    def request_failures(self) -> int:
        """Requests answered with an error of their own (the worker went on)."""
        return self._parts.applier.request_failures if self._parts is not None else 0

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, request: GenerateRequest) -> RequestHandle:
        """Queue a request; events arrive on the returned handle: an AdmittedEvent once it passed its checks and
        holds a sequence (or an ErrorEvent), then TokenEvents and the final DoneEvent or ErrorEvent. A prompt
        that leaves no room in the context is refused (PromptTooLongError); see :class:`GenerateRequest`."""
        handle = RequestHandle(next(self._ids))
        deadline = time.monotonic() + self._config.policy.session_resume_wait_ms / 1000.0
        with self._wake:
            # checked under the lock the worker drains the inbox with, so no request can slip in after the drain
            if self._stop.is_set() or not self._thread.is_alive():
                handle.fail(WorkerStoppedError(f"worker {self.name} is not running"))
                return handle
            self._inbox.append(Waiting(handle, request, deadline))
            self._wake.notify()
        return handle

    def call(self, fn: Callable[[ModelBackend], _T], timeout_s: float | None = 60.0) -> _T:
        """Run ``fn(backend)`` on the worker thread between two steps and return its result (or raise its error)."""
        result: _T = self._queue_call(self._calls, fn, timeout_s)
        return result

    def call_with_seq(self, fn: Callable[[ModelBackend, int], _T], timeout_s: float | None = 60.0) -> _T:
        """Like :meth:`call`, with an empty sequence lent to ``fn`` (waits for one to be free; emptied after)."""
        result: _T = self._queue_call(self._seq_calls, fn, timeout_s)
        return result

    def _queue_call(self, calls: deque[tuple[Any, Future[Any]]], fn: Any, timeout_s: float | None) -> Any:
        future: Future[Any] = Future()
        with self._wake:
            if self._stop.is_set() or not self._thread.is_alive():
                raise WorkerStoppedError(f"worker {self.name} is not running")
            calls.append((fn, future))
            self._wake.notify()
        return future.result(timeout_s)

    def reapply_adapters(self, timeout_s: float = 60.0) -> None:
        """Load / detach / rescale adapters to match the adapter provider (between two steps)."""
        self.call(self._apply_adapters, timeout_s)

    def save_live(self, reason: SaveReason, timeout_s: float = 10.0) -> int:
        """Save the committed state of every running sequence now (evict / shutdown saves); returns rows written."""
        return self.call(lambda backend: self._save_live(reason, timeout_s), timeout_s + 5.0)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current step, shutdown-save and fail what is left, close the backend on its own thread."""
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _nudge(self) -> None:
        """Wake the loop: a row a parked request waits for is settled (called on a writer thread)."""
        with self._wake:
            self._nudged = True
            self._wake.notify()

    # -- worker thread: lifecycle ----------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            backend = self._factory()
            self.info = backend.info
            if self._config.cache is not None:
                ns = namespace_for(backend.info, salt=self._config.salt)
                self.link = CacheLink(self._config.cache, self._config.policy, ns)
            parts = self._parts = _Parts(self, backend, self.link)
            if self._config.adapters is not None:
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
            with self._wake:
                self._stop.set()  # refuse new requests before draining the inbox
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
        provider = self._config.adapters
        specs = list(provider()) if provider is not None else []
        handles = self._adapter_handles
        for path, _, _ in specs:
            if path not in handles:
                handles[path] = backend.load_adapter(path)
        backend.set_adapters([(handles[path], scale) for path, _, scale in specs])
        wanted = {path for path, _, _ in specs}
        for path in [p for p in handles if p not in wanted]:
            backend.free_adapter(handles.pop(path))
        if self.link is not None:
            adapters = [(fp, scale) for _, fp, scale in specs]
            self.link.namespace = namespace_for(backend.info, adapters, self._config.salt)
        if self._parts is not None:
            for r in self._parts.table.running.values():
                r.cache.enabled = False  # its KV mixes two adapter settings: never restore or save it

    def _save_live(self, reason: SaveReason, timeout_s: float) -> int:
        parts = self._parts
        if self.link is None or parts is None:
            return 0
        return self.link.save_live(parts.backend, list(parts.table.running.values()), reason, timeout_s)

    def _shutdown_save(self) -> None:
        try:
            self._save_live(SaveReason.SHUTDOWN, self._config.shutdown_save_timeout_s)
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
        with self._wake:
            waiting = list(self._inbox)
            if self._admitting is not None:
                waiting.insert(0, self._admitting)
                self._admitting = None
            self._inbox.clear()
            calls: list[tuple[Any, Future[Any]]] = [*self._calls, *self._seq_calls]
            self._calls.clear()
            self._seq_calls.clear()
        for w in waiting:
            w.handle.fail(exc)
        for _, future in calls:
            future.set_exception(WorkerStoppedError(f"worker {self.name} stopped"))

    # -- worker thread: the loop -------------------------------------------------------------------------------------

    def _loop(self, parts: _Parts) -> None:
        running = parts.table.running
        try:
            while not self._stop.is_set():
                self._run_calls(parts)
                parked = self._admit(parts)
                self._cancel(parts)
                if running:
                    if not parked:
                        self._gather(parts)
                    if self._close_grace(parts):
                        continue
                    self._step(parts)
                    continue
                self._idle(parts, parked)
            parts.applier.close([r for r in running.values() if r.ended])
        finally:
            parts.outbox.flush(FlushPoint.IDLE)

    def _run_calls(self, parts: _Parts) -> None:
        backend, free = parts.backend, parts.table.free
        while True:
            fn: Callable[[ModelBackend], Any] | None = None
            seq_fn: Callable[[ModelBackend, int], Any] | None = None
            seq_id = -1
            with self._wake:
                if self._calls:
                    fn, future = self._calls.popleft()
                elif self._seq_calls and free:
                    seq_fn, future = self._seq_calls.popleft()
                    seq_id = free.take()
                else:
                    return
            parts.outbox.flush(FlushPoint.CALL)  # a call may take a while
            try:
                if future.set_running_or_notify_cancel():
                    if seq_fn is not None:
                        backend.seq_truncate(seq_id, 0)
                        future.set_result(seq_fn(backend, seq_id))
                    elif fn is not None:
                        future.set_result(fn(backend))
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
            while parts.table.free:
                with self._wake:
                    if not self._inbox:
                        break
                    w = self._admitting = self._inbox.popleft()
                try:
                    parts.admitter.admit(w, parked)
                except WorkerFault as fault:
                    parked.insert(0, w)  # back in the inbox: the crash fan-out answers it
                    raise fault.__cause__ or fault from None  # crash the worker: its supervisor restarts it
                except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                    parts.admitter.reject(w, exc)
                finally:
                    self._admitting = None
        finally:
            if parked:  # (a crash too: what is parked must be in the inbox to be answered)
                with self._wake:
                    self._inbox.extendleft(reversed(parked))
        return bool(parked)

    def _cancel(self, parts: _Parts) -> None:
        for r in [r for r in parts.table.running.values() if r.handle.cancelled and not r.ended]:
            try:
                parts.applier.complete(r, FinishReason.CANCELLED, save=False)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                parts.applier.fail(r, exc)

    def _gather(self, parts: _Parts) -> None:
        """Dynamic batching (planner.gather_wait_s): admit requests arriving within the wait into this step."""
        table, n_batch, rules = parts.table, parts.backend.info.n_batch, self._batching
        seqs = list(table.running.values())
        wait = gather_wait_s(
            seqs, n_batch=n_batch, free_seqs=bool(table.free), s_per_token=parts.cost.s_per_token, rules=rules
        )
        if wait <= 0:
            return
        deadline = time.perf_counter() + wait
        while table.free and gather_has_room(seqs, n_batch=n_batch, rules=rules) and not self._stop.is_set():
            with self._wake:
                left = deadline - time.perf_counter()
                if not self._inbox and (left <= 0 or self._calls or self._seq_calls):
                    return
                if not self._inbox:
                    self._wake.wait(left)
                    continue
            if self._admit(parts):
                return  # a request is parked: the row it needs is being written
            seqs = list(table.running.values())

    def _close_grace(self, parts: _Parts) -> bool:
        """With only ended replies left to close, wait out the close grace for a new request (planner.close_grace_s),
        waking for it at once. True when it waited."""
        running = list(parts.table.running.values())
        left = close_grace_s(running, [r.t_closing for r in running], time.monotonic(), self._batching)
        if left <= 0:
            return False
        parts.outbox.flush(FlushPoint.IDLE)
        with self._wake:
            if self._inbox or self._calls or self._seq_calls or self._stop.is_set():
                return False
            self._wake.wait(left)
        return True

    def _step(self, parts: _Parts) -> None:
        """plan → flush → decode → apply."""
        table = parts.table
        plan = plan_step(
            list(table.running.values()),
            n_batch=parts.backend.info.n_batch,
            free_seqs=bool(table.free),
            rules=self._batching,
        )
        self.phase = plan.phase
        parts.outbox.flush(FlushPoint.DECODE)  # the last step's tokens go out now: the loops run while this decode
        t0 = time.perf_counter()  # holds no GIL
        rows = parts.backend.decode(plan.items)
        parts.cost.record(plan.n_tokens, time.perf_counter() - t0)
        self.ticks += 1
        parts.applier.apply(plan, rows)

    def _idle(self, parts: _Parts, parked: bool) -> None:
        parts.outbox.flush(FlushPoint.IDLE)
        self.phase = Phase.IDLE
        with self._wake:
            idle = (parked or not self._inbox) and not self._calls and not self._seq_calls
            if idle and not self._stop.is_set() and not self._nudged:
                wait = self._config.idle_wait_s
                if parked:  # woken by the row's save; at the latest when the first parked request stops waiting
                    now = time.monotonic()
                    wait = min([wait, *(max(w.deadline - now, 0.0) + 0.001 for w in self._inbox)])
                self._wake.wait(wait)
            self._nudged = False
