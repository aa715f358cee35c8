"""``ModelWorker``: one thread that owns a backend for its whole life and serves requests by continuous batching.

Requests wait in a FIFO until a sequence slot is free. Every tick builds one batch: first the pending token of each
generating sequence (so streams keep flowing), then prefill chunks of prompting sequences in arrival order, up to
``n_batch`` tokens; a long prompt is spread over several ticks instead of freezing the others. After the decode,
each sequence that produced logits samples its next token, which is streamed as an event.

With a cache (:class:`~erllama.model.cachelink.CacheLink`), admission restores the longest stored prefix of the
request's context (at most all but its last token). The last prompt token is decoded in a step of its own, warm or
cold, so an exact hit gives the very logits of the cold run — unless the backend is batch-invariant and can cut
rows back (``BackendInfo.last_token_foldable``): then it rides in the final prefill chunk (same logits, one weight
pass fewer) and the prompt's cold row is taken after the first token is out, off the time-to-first-token.

States are saved per the policy: at the cold save point, every ``continued_interval`` generated tokens, at the
finish, and for live sequences at shutdown. A reply's end is announced as soon as its last token is sampled; the
sequence then closes with the next tick (that token decoded with the other sequences' tokens, so the finish row
holds the whole context), its row reserved in the store meanwhile. ``finish_key`` names the finish row; passed back
as ``parent_key`` it continues that context, and a request whose context extends a reply waits (up to
``session_resume_wait_ms``) for that reply's row rather than computing it again.

Before a tick that only starts prefills, the worker waits a moment for requests arriving with them (dynamic
batching, bounded by ``batch_wait_s`` and by 1% of the tick's estimated time; ``BatchingConfig`` names the rules).

Other threads only enqueue requests, read events and set cancel flags; a cancel is observed at the next tick, i.e.
within one token or one prefill chunk, and frees the sequence. Phase, queue depth and in-flight count are plain
attributes published by the worker, so readers never wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import heapq
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from erllama.cache.key import CacheKey
from erllama.cache.kvc import SaveReason
from erllama.errors import (
    ErllamaError,
    InvalidInputError,
    PromptTooLongError,
    RequestFailedError,
    TokenIdError,
    WorkerStoppedError,
)
from erllama.model.backend import BackendInfo, DecodeItem, ModelBackend, TokenLogprob, token_logprob
from erllama.model.cachelink import CacheHit, CacheLink, namespace_for
from erllama.model.config import WorkerConfig
from erllama.model.request import GenerateRequest
from erllama.model.stop import StopMatcher
from erllama.text import Detokenizer

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


class Phase(enum.Enum):
    IDLE = "idle"
    PREFILLING = "prefilling"
    GENERATING = "generating"


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-generation token
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEvent:
    """A reply token and the text it completes (possibly empty). ``token`` is -1 for text released only at the end
    (held back while it could still have begun a stop sequence)."""

    token: int
    text: str
    logprob: TokenLogprob | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DoneEvent:
    """The end of a request: the reply, the context it leaves in the KV cache, and how it was served.

    ``context_tokens`` is the whole context the request ended with (prompt, generated tokens and the end token
    that stopped it), ``committed_tokens`` how many of them are in the KV cache (and in the finish save, whose key is
    ``finish_key`` — pass it as ``parent_key`` to continue). ``cache_hit`` is ``exact``, ``partial`` or ``cold``.
    """

    finish_reason: FinishReason
    tokens: tuple[int, ...]
    text: str  # the reply as streamed: a matched stop sequence is trimmed
    prompt_tokens: int
    prefill_s: float
    generate_s: float
    stop_sequence: str | None = None
    context_tokens: tuple[int, ...] = ()
    committed_tokens: int = 0
    finish_key: CacheKey | None = None
    cache_hit: str = "cold"
    restored_tokens: int = 0
    prefilled_tokens: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class AdmittedEvent:
    """The request passed every check and holds a sequence: the first event of a request that runs (a request that
    fails its checks gets an ErrorEvent instead). ``prompt_tokens`` is its whole context, ``restored_tokens`` what
    the cache restored of it, ``max_tokens`` the reply length it may reach (after ``fit_context``)."""

    prompt_tokens: int
    restored_tokens: int
    max_tokens: int
    cache_hit: str = "cold"


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: BaseException


Event = AdmittedEvent | TokenEvent | DoneEvent | ErrorEvent


class _Mailbox:
    """Events bound for one event loop, delivered in batches: the first post since the loop last drained wakes it
    (one self-pipe write); later posts ride along. With N streams on one loop a tick costs one wake-up, not N."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Event], Event]] = []
        self._closed = False  # a wake-up found the loop closed: every later post raises

    def post(self, aq: asyncio.Queue[Event], event: Event) -> None:
        """Raises RuntimeError when the loop is closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the consumer's event loop is closed")
            if len(self._items) and self._loop.is_closed():
                # the loop closed after a drain was scheduled (that drain never runs): nobody is listening
                self._items.clear()
                self._closed = True
                raise RuntimeError("the consumer's event loop is closed")
            self._items.append((aq, event))
            if len(self._items) > 1:
                return  # a drain is already scheduled
        held: dict[_Mailbox, None] | None = getattr(_held, "boxes", None)
        if held is not None:
            held[self] = None  # woken when the posting thread releases its held deliveries
            return
        self.wake()

    def wake(self) -> None:
        """Schedule a drain on the loop. Raises RuntimeError when the loop is closed."""
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._items.clear()
                self._closed = True
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for aq, event in items:
            aq.put_nowait(event)


_held = threading.local()


@contextlib.contextmanager
def _deliveries_held() -> Iterator[None]:
    """Hold this thread's event-loop wake-ups until :func:`_release_held` or the end of the block.

    The worker holds them from one decode to the next, so consumers' loops wake once per tick, just as the next
    decode starts and runs without the GIL. Woken at the first sampled token instead, a loop would compete for the
    GIL with the worker's sampling and batch building (every cffi call hands the GIL over) and delay the decode.
    Cache saves keep them held too (but for a folded prompt's row, copied once its first token is out): a loop woken
    before a state copy takes the GIL while the copy runs in C and keeps it (a finished stream's last chunks and
    teardown), and the copy's return waits for it — finish saves took 3-13 ms that way against 1-2.5 ms held, with
    the other streams' next decode waiting on each.
    """
    _held.boxes = {}
    try:
        yield
    finally:
        _release_held()
        _held.boxes = None


def _release_held() -> None:
    """Wake the loops this thread's held deliveries are bound for, now (before a decode, a call or idling)."""
    boxes: dict[_Mailbox, None] | None = getattr(_held, "boxes", None)
    if boxes:
        woken = list(boxes)
        boxes.clear()
        for box in woken:
            with contextlib.suppress(RuntimeError):  # a closed loop: its requests' next posts raise and cancel them
                box.wake()


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


class RequestHandle:
    """The caller's side of a request: an event stream and a cancel switch (both usable from any thread)."""

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._async: tuple[_Mailbox, asyncio.Queue[Event]] | None = None
        self._cancel = threading.Event()
        self._finished = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to stop this request; idempotent. The final event says ``cancelled``."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def events(self, timeout_s: float | None = None) -> Iterator[Event]:
        """Events until (and including) the final DoneEvent or ErrorEvent."""
        while True:
            event = self._events.get(timeout=timeout_s)
            yield event
            if isinstance(event, DoneEvent | ErrorEvent):
                return

    def result(self, timeout_s: float | None = None) -> DoneEvent:
        """Wait for the request to finish; raises the worker's error if it failed."""
        for event in self.events(timeout_s):
            if isinstance(event, DoneEvent):
                return event
            if isinstance(event, ErrorEvent):
                raise event.error
        raise WorkerStoppedError("the event stream ended without a result")  # pragma: no cover

    def async_queue(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[Event]:
        """Switch delivery to an asyncio queue of ``loop`` (events already queued move over first)."""
        with self._lock:
            if self._async is not None:
                raise InvalidInputError("this request is already being consumed asynchronously")
            aq: asyncio.Queue[Event] = asyncio.Queue()
            while not self._events.empty():
                aq.put_nowait(self._events.get_nowait())
            self._async = (_mailbox(loop), aq)
        return aq

    def _emit(self, event: Event) -> None:
        with self._lock:
            if self._finished.is_set():
                return
            if isinstance(event, DoneEvent | ErrorEvent):
                self._finished.set()
            if self._async is None:
                self._events.put(event)
                return
            box, aq = self._async
        try:
            box.post(aq, event)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            self.cancel()


@dataclasses.dataclass(slots=True)
class _Waiting:
    handle: RequestHandle
    request: GenerateRequest
    deadline: float  # a parent_key request waits for its parent's in-flight save until then
    tokens: list[int] | None = None  # the prompt's tokens, once tokenized (a parked request keeps them)
    seq_id: int | None = None  # the sequence it took while being admitted (given back if admission fails)


@dataclasses.dataclass(slots=True)
class _Active:
    handle: RequestHandle
    seq_id: int
    tokens: list[int]  # the context: the prompt, then every sampled token (including a final end token)
    n_prompt: int
    max_tokens: int
    detok: Detokenizer
    stops: StopMatcher | None
    hit: CacheHit
    use_cache: bool
    fed: int  # context tokens in the KV cache
    fold: bool = False  # the last prompt token rides in the final chunk (BackendInfo.last_token_foldable)
    cold_point: int | None = None  # where the prompt is saved while prefilling
    last_save: int = 0  # fed at the last save (or restore)
    n_generated: int = 0  # reply tokens streamed
    closing: FinishReason | None = None  # ended and announced; its last token is committed next tick, then saved
    reserved: bool = False  # holds the reservation of its finish row (taken when it started closing)
    t_closing: float = 0.0  # when it started closing (time.monotonic)
    text: list[str] = dataclasses.field(default_factory=list)
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    t_first: float = 0.0
    logprobs: int | None = None  # report each reply token's logprob and this many alternatives


class _FreeSeqs:
    """The free sequence ids, lowest first. Keeping the busy ones low and contiguous matters: with one KV stream
    per sequence, llama.cpp splits a batch into one micro-batch per run of consecutive ids, and every extra
    micro-batch is another pass over the weights (a gap costs a whole decode step)."""

    def __init__(self, n: int) -> None:
        self._heap = list(range(n))

    def __bool__(self) -> bool:
        return bool(self._heap)

    def take(self) -> int:
        return heapq.heappop(self._heap)

    def give(self, seq_id: int) -> None:
        heapq.heappush(self._heap, seq_id)


def _reply_room(n_prompt: int, max_tokens: int | None, n_ctx: int, fit: bool) -> int | None:
    """The reply length a request of ``n_prompt`` context tokens may reach, or None when it does not fit: the
    context's room after the prompt when ``max_tokens`` is None, ``max_tokens`` lowered to that room with ``fit``,
    else ``max_tokens`` itself when prompt and reply fit together. A prompt-only request (``max_tokens=0``) needs
    no room for a reply; any other needs room for one token at least."""
    room = n_ctx - n_prompt
    if max_tokens is None:
        return room if room >= 1 else None
    if fit:
        return min(max_tokens, room) if room >= min(max_tokens, 1) else None
    return max_tokens if n_prompt + max_tokens <= n_ctx else None


class _WorkerFault(Exception):
    """Wraps a failure of the worker's own work (a decode) that happened while one request was being handled, so
    that it crashes the worker instead of being charged to that request."""


_T = TypeVar("_T")
_NO_HIT = CacheHit("cold", 0)


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
        self._cache = cfg.cache
        self._policy = cfg.policy
        self._salt = cfg.salt
        self._adapter_specs = cfg.adapters
        self._adapter_handles: dict[str, object] = {}
        self._shutdown_save_timeout_s = cfg.shutdown_save_timeout_s
        self._idle_wait_s = cfg.idle_wait_s
        self._batching = cfg.batching
        self._s_per_token: float | None = None  # decode seconds per token, from recent prefill-sized ticks
        # finish rows announced but not restorable yet: their context and how much of it was the prompt
        self._finishing: dict[CacheKey, tuple[tuple[int, ...], int]] = {}
        self._inbox: deque[_Waiting] = deque()
        self._calls: deque[tuple[Callable[[ModelBackend], Any], Future[Any]]] = deque()
        self._seq_calls: deque[tuple[Callable[[ModelBackend, int], Any], Future[Any]]] = deque()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._active: dict[int, _Active] = {}  # worker thread only
        self._admitting: _Waiting | None = None  # off the inbox, not active yet: answered too if the worker dies
        self.request_failures = 0  # requests answered with an error of their own (the worker went on)
        self.link: CacheLink | None = None  # set on the worker thread once the backend is loaded
        self.info: BackendInfo | None = None
        self.phase = Phase.IDLE
        self.in_flight = 0
        self.pending_len = 0  # prompt tokens still to prefill over the active sequences
        self.last_hit: CacheHit | None = None
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
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, request: GenerateRequest) -> RequestHandle:
        """Queue a request; events arrive on the returned handle: an AdmittedEvent once it passed its checks and
        holds a sequence (or an ErrorEvent), then TokenEvents and the final DoneEvent or ErrorEvent. A prompt
        that leaves no room in the context is refused (PromptTooLongError); see :class:`GenerateRequest`."""
        handle = RequestHandle(next(self._ids))
        waiting = _Waiting(handle, request, time.monotonic() + self._policy.session_resume_wait_ms / 1000.0)
        with self._wake:
            # checked under the lock the worker drains the inbox with, so no request can slip in after the drain
            if self._stop.is_set() or not self._thread.is_alive():
                handle._emit(ErrorEvent(WorkerStoppedError(f"worker {self.name} is not running")))
                return handle
            self._inbox.append(waiting)
            self._wake.notify()
        return handle

    def call(self, fn: Callable[[ModelBackend], _T], timeout_s: float | None = 60.0) -> _T:
        """Run ``fn(backend)`` on the worker thread between two ticks and return its result (or raise its error)."""
        future: Future[_T] = Future()
        with self._wake:
            if self._stop.is_set() or not self._thread.is_alive():
                raise WorkerStoppedError(f"worker {self.name} is not running")
            self._calls.append((fn, future))
            self._wake.notify()
        return future.result(timeout_s)

    def call_with_seq(self, fn: Callable[[ModelBackend, int], _T], timeout_s: float | None = 60.0) -> _T:
        """Like :meth:`call`, with an empty sequence lent to ``fn`` (waits for one to be free; emptied after)."""
        future: Future[_T] = Future()
        with self._wake:
            if self._stop.is_set() or not self._thread.is_alive():
                raise WorkerStoppedError(f"worker {self.name} is not running")
            self._seq_calls.append((fn, future))
            self._wake.notify()
        return future.result(timeout_s)

    def reapply_adapters(self, timeout_s: float = 60.0) -> None:
        """Load / detach / rescale adapters to match the adapter provider (between two ticks)."""
        self.call(self._apply_adapters, timeout_s)

    def save_live(self, reason: SaveReason, timeout_s: float = 10.0) -> int:
        """Save the committed state of every active sequence now (evict / shutdown saves); returns rows written."""
        return self.call(lambda backend: self._save_live(backend, reason, timeout_s), timeout_s + 5.0)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current tick, shutdown-save and fail what is left, close the backend on its own thread."""
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- worker thread ---------------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            backend = self._factory()
            self.info = backend.info
            if self._cache is not None:
                self.link = CacheLink(self._cache, self._policy, namespace_for(backend.info, salt=self._salt))
            if self._adapter_specs is not None:
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
        active = self._active
        try:
            self._loop(backend, active)
        except Exception as exc:
            log.exception("worker %s crashed", self.name)
            self.crash = exc
            # its requests learn that the worker died, not its internals (a raw OSError names paths): the cause is
            # chained for the log and for callers in this process
            stopped = WorkerStoppedError(f"the worker of model {self.name} crashed ({type(exc).__name__})")
            stopped.__cause__ = exc
            self._fail_all(active, stopped)
        finally:
            with self._wake:
                self._stop.set()  # refuse new requests before draining the inbox
            if self.crash is None:
                self._shutdown_save(backend)
            self._fail_all(active, WorkerStoppedError(f"worker {self.name} stopped"))
            self.phase = Phase.IDLE
            try:
                backend.close()
            finally:
                if self._on_exit is not None:
                    self._on_exit(self.crash)

    def _apply_adapters(self, backend: ModelBackend) -> None:
        specs = list(self._adapter_specs()) if self._adapter_specs is not None else []
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
            self.link.namespace = namespace_for(backend.info, adapters, self._salt)
        for a in self._active.values():
            a.use_cache = False  # its KV mixes two adapter settings: never restore or save it

    def _shutdown_save(self, backend: ModelBackend) -> None:
        try:
            self._save_live(backend, SaveReason.SHUTDOWN, self._shutdown_save_timeout_s)
        except Exception:  # a failed shutdown save must not keep the backend from being freed
            log.exception("worker %s: shutdown save failed", self.name)

    def _save_live(self, backend: ModelBackend, reason: SaveReason, timeout_s: float) -> int:
        link = self.link
        saved = 0
        if link is None:
            return 0
        for a in self._active.values():
            if a.use_cache and a.fed > a.last_save and link.final_allowed(a.fed):
                saved += link.save_sync(backend, a.seq_id, a.tokens[: a.fed], reason, timeout_s)
                a.last_save = a.fed
        return saved

    def _fail_all(self, active: dict[int, _Active], exc: BaseException) -> None:
        for a in active.values():
            if a.closing is None:
                a.handle._emit(ErrorEvent(exc))
            elif a.reserved and self.link is not None:
                self.link.release(a.tokens)  # its end went out already; its finish row will not be written
        active.clear()
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
            w.handle._emit(ErrorEvent(exc))
        for _, future in calls:
            future.set_exception(WorkerStoppedError(f"worker {self.name} stopped"))
        self.in_flight = 0
        self.pending_len = 0

    def _run_calls(self, backend: ModelBackend, free: _FreeSeqs) -> None:
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
            _release_held()  # a call may take a while
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
                    backend.seq_truncate(seq_id, 0)
                    free.give(seq_id)

    def _loop(self, backend: ModelBackend, active: dict[int, _Active]) -> None:
        info = backend.info
        free = _FreeSeqs(info.n_seq_max)
        with _deliveries_held():  # released right before each decode, before a call and before idling
            while not self._stop.is_set():
                self._run_calls(backend, free)
                parked = self._admit(backend, active, free)
                for a in [a for a in active.values() if a.handle.cancelled and a.closing is None]:
                    try:
                        self._complete(backend, active, free, a, FinishReason.CANCELLED, save=False)
                    except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                        self._fail_active(backend, active, free, a, exc)
                if active:
                    if not parked:
                        self._gather(backend, active, free)
                    if self._closing_can_wait(active):
                        continue
                    self._tick(backend, active, free)
                    continue
                _release_held()
                self.phase = Phase.IDLE
                with self._wake:
                    idle = (parked or not self._inbox) and not self._calls and not self._seq_calls
                    if idle and not self._stop.is_set():
                        self._wake.wait(0.002 if parked else self._idle_wait_s)
            self._close(backend, active, free, [a for a in active.values() if a.closing is not None])

    def _admit(self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs) -> bool:
        """Admit waiting requests while sequences are free; returns True if a request is parked (waiting for its
        parent's row or for the row of the reply it continues). A request whose admission fails (it cannot be
        tokenized, its sampler cannot be built, ...) is answered with the error alone: its sequence is freed and
        the worker goes on."""
        parked: list[_Waiting] = []
        try:
            while free:
                with self._wake:
                    if not self._inbox:
                        break
                    w = self._admitting = self._inbox.popleft()
                try:
                    self._admit_one(backend, active, free, w, parked)
                except _WorkerFault as fault:
                    parked.insert(0, w)  # back in the inbox: the crash fan-out answers it
                    raise fault.__cause__ or fault from None  # crash the worker: its supervisor restarts it
                except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                    self._reject(backend, active, free, w, exc)
                finally:
                    self._admitting = None
        finally:
            if parked:  # (a crash too: what is parked must be in the inbox to be answered)
                with self._wake:
                    self._inbox.extendleft(reversed(parked))
        return bool(parked)

    def _admit_one(
        self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs, w: _Waiting, parked: list[_Waiting]
    ) -> None:
        if w.handle.cancelled:
            w.handle._emit(DoneEvent(FinishReason.CANCELLED, (), "", 0, 0.0, 0.0))
            return
        tokens = self._context_of(backend, w, parked)
        if tokens is None:
            return
        if self._awaits_reply_row(backend, active, free, w, tokens):
            parked.append(w)
            return
        n_ctx, n_vocab = backend.info.n_ctx_seq, backend.info.n_vocab
        if min(tokens) < 0 or max(tokens) >= n_vocab:
            bad = next(t for t in tokens if not 0 <= t < n_vocab)
            w.handle._emit(ErrorEvent(TokenIdError(bad, n_vocab)))
            return
        max_tokens = _reply_room(len(tokens), w.request.max_tokens, n_ctx, w.request.fit_context)
        if max_tokens is None:
            w.handle._emit(
                ErrorEvent(
                    PromptTooLongError(len(tokens), None if w.request.fit_context else w.request.max_tokens, n_ctx)
                )
            )
            return
        t_start = time.perf_counter()  # the restore counts towards time-to-first-token
        seq_id = w.seq_id = free.take()
        backend.seq_truncate(seq_id, 0)
        link = self.link if w.request.use_cache else None
        hit = link.restore(backend, seq_id, tokens, w.request.parent_key) if link is not None else _NO_HIT
        backend.set_sampler(seq_id, w.request.sampling)
        a = _Active(
            w.handle,
            seq_id,
            tokens,
            len(tokens),
            max_tokens,
            Detokenizer(backend),
            StopMatcher(w.request.stop) if w.request.stop else None,
            hit,
            link is not None,
            fed=hit.prefix_len,
            fold=backend.info.last_token_foldable,
            last_save=hit.prefix_len,
            t_start=t_start,
            logprobs=w.request.logprobs,
        )
        if link is not None:
            a.cold_point = link.cold_point(len(tokens), hit.prefix_len)
            if a.fold and a.cold_point == len(tokens) - 1:
                a.cold_point = len(tokens)  # the whole prompt, saved once the first token is out
        active[seq_id] = a
        w.seq_id = None
        self.last_hit = hit
        self.in_flight = len(active)
        w.handle._emit(AdmittedEvent(len(tokens), hit.prefix_len, max_tokens, hit.kind))

    def _reject(
        self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs, w: _Waiting, exc: Exception
    ) -> None:
        """A request failed while being admitted: answer it, and give back the sequence it took."""
        seq_id, w.seq_id = w.seq_id, None
        if seq_id is not None:
            a = active.get(seq_id)
            if a is not None and a.handle is w.handle:
                del active[seq_id]
            self._free_seq(backend, free, seq_id)
            self.in_flight = len(active)
        self._report(w.handle, exc)

    def _fail_active(
        self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs, a: _Active, exc: Exception
    ) -> None:
        """A running request failed on its own (its sampler, its stop text, its save ...): answer it alone, free its
        sequence; the other sequences and the worker go on."""
        if active.get(a.seq_id) is a:
            del active[a.seq_id]
            self._free_seq(backend, free, a.seq_id)
        if a.reserved and self.link is not None:
            with contextlib.suppress(Exception):
                self.link.release(a.tokens)
            a.reserved = False
        self.in_flight = len(active)
        if a.closing is None:
            self._report(a.handle, exc)
        else:  # its end went out already; only its finish row is lost
            log.warning("worker %s: closing request %d failed: %r", self.name, a.handle.id, exc)

    def _free_seq(self, backend: ModelBackend, free: _FreeSeqs, seq_id: int) -> None:
        try:
            backend.seq_truncate(seq_id, 0)
        finally:
            free.give(seq_id)

    def _report(self, handle: RequestHandle, exc: Exception) -> None:
        self.request_failures += 1
        if isinstance(exc, ErllamaError):
            error: Exception = exc
        else:
            log.error("worker %s: request %d failed", self.name, handle.id, exc_info=exc)
            error = RequestFailedError(f"the request failed inside the model worker ({type(exc).__name__})")
        handle._emit(ErrorEvent(error))

    def _gather(self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs) -> None:
        """Give a burst of requests a moment to share the tick that starts their prefill.

        Clients that fire together reach the worker a few milliseconds apart (each request is parsed and validated
        in turn). Started at the first one, a prefill tick runs it alone, and the rest queue behind a tick that
        could have held them — on a CPU a ~100-token prompt is a tick of hundreds of milliseconds. So before a tick
        that only prefills, has a prompt that has not been fed yet and leaves room in the batch, the worker waits
        for more requests: at most ``batch_wait_s``, and at most ``gather_share`` of the tick's estimated time,
        so a lone request loses at most that share of its time to first token. No sequence is generating then,
        so no stream waits on it.
        """
        if self._batching.batch_wait_s <= 0 or self._s_per_token is None or not free:
            return
        if any(a.fed >= a.n_prompt for a in active.values()) or all(a.fed > a.hit.prefix_len for a in active.values()):
            return
        n_batch = backend.info.n_batch
        pending = sum(a.n_prompt - a.fed for a in active.values())
        rules = self._batching
        deadline = time.perf_counter() + min(rules.batch_wait_s, rules.gather_share * pending * self._s_per_token)
        while free and pending + rules.min_cut_chunk <= n_batch and not self._stop.is_set():
            with self._wake:
                left = deadline - time.perf_counter()
                if not self._inbox and (left <= 0 or self._calls or self._seq_calls):
                    return
                if not self._inbox:
                    self._wake.wait(left)
                    continue
            if self._admit(backend, active, free):
                return  # a request is parked: the row it needs is being written
            pending = sum(a.n_prompt - a.fed for a in active.values())

    def _closing_can_wait(self, active: dict[int, _Active]) -> bool:
        """With only ended replies left to close, wait a moment for a new request (waking for it at once): a client
        that sends its next request the moment a reply ends then has its prompt go first, and the closing rows ride
        along with its generation instead of holding up its time to first token. True when it waited."""
        if any(a.closing is None for a in active.values()):
            return False
        left = min(a.t_closing for a in active.values()) + self._batching.close_grace_s - time.monotonic()
        if left <= 0:
            return False
        _release_held()
        with self._wake:
            if self._inbox or self._calls or self._seq_calls or self._stop.is_set():
                return False
            self._wake.wait(left)
        return True

    def _awaits_reply_row(
        self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs, w: _Waiting, tokens: list[int]
    ) -> bool:
        """Whether the request continues a reply whose finish row is not restorable yet (the next turn of a chat,
        sent the moment the reply ended): it then waits for the row, up to its deadline, rather than computing the
        reply's tokens again. A reply still closing is closed at once, its row handed to the writer. "Continues":
        shares that request's prompt and the reply's first token (a chat template may render the reply's end
        differently from the tokens that ended it, so the whole reply need not match), or — a prompt no longer than
        that one — all the row could restore of it (a repeated prompt)."""
        if not self._finishing or self.link is None:
            return False
        store = self.link.store
        for key, (context, n_prompt) in list(self._finishing.items()):
            if key in store or not store.pending(key):
                del self._finishing[key]
            elif (m := min(n_prompt + 1, len(tokens) - 1, len(context))) > 0 and tuple(tokens[:m]) == context[:m]:
                closing = [a for a in active.values() if a.closing is not None and tuple(a.tokens) == context]
                self._close(backend, active, free, closing)
                return time.monotonic() < w.deadline
        return False

    def _context_of(self, backend: ModelBackend, w: _Waiting, parked: list[_Waiting]) -> list[int] | None:
        """The request's whole context: its prompt, after its parent's tokens for a parent_key continuation."""
        r = w.request
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
                w.handle._emit(ErrorEvent(PromptTooLongError(at_least, reserved or None, n_ctx, at_least=True)))
                return None
            try:
                w.tokens = backend.tokenize(r.prompt, add_special=r.parent_key is None, parse_special=True)
            except InvalidInputError as exc:
                w.handle._emit(ErrorEvent(exc))
                return None
            if not w.tokens:
                w.handle._emit(ErrorEvent(InvalidInputError("the prompt tokenizes to nothing")))
                return None
        if w.request.parent_key is None:
            return w.tokens
        link = self.link
        if link is None:
            w.handle._emit(ErrorEvent(InvalidInputError("parent_key needs a model loaded with a cache")))
            return None
        if link.parent_pending(w.request.parent_key) and time.monotonic() < w.deadline:
            parked.append(w)  # its parent's finish save is still being written
            return None
        parent = link.parent_tokens(w.request.parent_key)
        if parent is None:
            w.handle._emit(ErrorEvent(InvalidInputError("unknown parent_key: no such finish key in this namespace")))
            return None
        return [*parent, *w.tokens]

    def _tick(self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs) -> None:
        budget = backend.info.n_batch
        items: list[DecodeItem] = []
        owners: list[_Active] = []
        # generating sequences first: their pending token. A closing row stays out of a tick that would otherwise
        # hold only prefill chunks: it would cost the tick a micro-batch of its own (a pass over the weights).
        prefill = any(a.fed < a.n_prompt for a in active.values())
        live = any(a.closing is None and a.n_prompt <= a.fed for a in active.values())
        # Unless every sequence is taken: then it goes now, and its sequence is free for the next request to arrive.
        skip_closing = prefill and not live and bool(free)
        for a in active.values():
            if a.closing is not None and skip_closing:
                continue
            if a.n_prompt <= a.fed < len(a.tokens) and budget > 0:
                items.append(DecodeItem(a.seq_id, [a.tokens[a.fed]], logits=a.closing is None))
                owners.append(a)
                budget -= 1
        prefilling = False
        for a in active.values():  # then prefill chunks, in arrival order
            if a.fed < a.n_prompt and budget > 0:
                if not a.fold and a.fed == a.n_prompt - 1:  # the last prompt token gets a step of its own
                    chunk = a.tokens[a.fed : a.n_prompt]
                else:
                    end = a.n_prompt if a.fold else a.n_prompt - 1
                    if a.cold_point is not None and a.fed < a.cold_point < end:
                        end = a.cold_point
                    if prefilling and a.fed + budget < end and budget < self._batching.min_cut_chunk:
                        continue  # a scrap of a prompt would cost llama.cpp a micro-batch: next tick instead
                    chunk = a.tokens[a.fed : min(end, a.fed + budget)]
                items.append(DecodeItem(a.seq_id, chunk, logits=a.fed + len(chunk) == a.n_prompt))
                owners.append(a)
                budget -= len(chunk)
                prefilling = True
        self.phase = Phase.PREFILLING if prefilling else Phase.GENERATING
        _release_held()  # the last tick's tokens go out now: the loops run while this decode holds no GIL
        n_tokens = sum(len(item.tokens) for item in items)
        t0 = time.perf_counter()
        rows = backend.decode(items)
        per_token = (time.perf_counter() - t0) / max(n_tokens, 1)
        if n_tokens >= self._batching.min_cut_chunk:
            old = self._s_per_token
            self._s_per_token = per_token if old is None else 0.5 * (old + per_token)
        elif self._s_per_token is None:
            self._s_per_token = per_token  # an overestimate (small batches cost more per token) until a prefill
        self.ticks += 1
        # The step's tokens, picked together (one pass over the logits). Rows that end their request unsampled are
        # left out: closing ones, and those that reached max_tokens (a prefill-only request).
        picks = [
            (a.seq_id, row)
            for a, row in zip(owners, rows, strict=True)
            if row is not None and a.closing is None and a.n_generated < a.max_tokens
        ]
        sampled, failed = self._sample(backend, picks)
        closed: list[_Active] = []
        firsts = False
        for a, item, row in zip(owners, items, rows, strict=True):
            a.fed += len(item.tokens)
            try:
                if a.seq_id in failed:
                    raise failed[a.seq_id]
                after_first = a.cold_point == a.n_prompt == a.fed  # a folded prompt is saved after its first token
                if not after_first:
                    self._maybe_save(backend, a)
                if a.closing is not None:
                    closed.append(a)  # its finish row is copied once the others' tokens are handled
                elif row is not None:
                    firsts = firsts or not a.t_first
                    self._sampled(backend, active, free, a, row, token=sampled.get(a.seq_id))
                if after_first and active.get(a.seq_id) is a:
                    _release_held()  # the first token goes out before the prompt's row is copied: off the TTFT
                    self._maybe_save(backend, a)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                self._fail_active(backend, active, free, a, exc)
        if closed and (firsts or all(a.closing is not None for a in active.values())):
            # Tokens go out before finish rows are copied when they are first tokens (off their time to first token)
            # or when no sequence is left generating (the copies then hold up no one's next token).
            _release_held()
        for a in closed:
            try:
                self._complete(backend, active, free, a, a.closing or FinishReason.STOP, save=True)
            except Exception as exc:  # noqa: BLE001 - that request's failure, not the worker's
                self._fail_active(backend, active, free, a, exc)
        self.pending_len = sum(a.n_prompt - a.fed for a in active.values() if a.fed < a.n_prompt)

    def _sample(
        self, backend: ModelBackend, picks: list[tuple[int, int]]
    ) -> tuple[dict[int, int], dict[int, Exception]]:
        """Sample every pick in one pass; when that fails, row by row, so only the rows that fail (a sampler a
        request's parameters broke) are charged with it. Returns (seq_id -> token, seq_id -> error)."""
        if not picks:
            return {}, {}
        try:
            return dict(zip((s for s, _ in picks), backend.sample_rows(picks), strict=True)), {}
        except Exception:  # noqa: BLE001 - found out row by row below
            pass
        sampled: dict[int, int] = {}
        failed: dict[int, Exception] = {}
        for pick in picks:
            try:
                sampled[pick[0]] = backend.sample_rows([pick])[0]
            except Exception as exc:  # noqa: BLE001 - that request's failure
                failed[pick[0]] = exc
        return sampled, failed

    def _maybe_save(self, backend: ModelBackend, a: _Active) -> None:
        link = self.link
        if link is None or not a.use_cache:
            return
        if a.cold_point is not None and a.fed == a.cold_point:
            link.save(backend, a.seq_id, a.tokens[: a.fed], SaveReason.COLD)
            a.last_save, a.cold_point = a.fed, None
        elif a.fed > a.n_prompt and a.closing is None and link.continued_due(a.fed, a.fed - a.last_save):
            link.save(backend, a.seq_id, a.tokens[: a.fed], SaveReason.CONTINUED)
            a.last_save = a.fed

    def _sampled(
        self,
        backend: ModelBackend,
        active: dict[int, _Active],
        free: _FreeSeqs,
        a: _Active,
        row: int,
        *,
        token: int | None,
    ) -> None:
        """``token``: the one sampled from ``row``; None when the request was not sampled, having reached max_tokens
        (max_tokens == 0: prefill only)."""
        if token is None:
            self._finish(backend, active, free, a, FinishReason.LENGTH)
            return
        logits = backend.logits(row) if a.logprobs is not None else None
        if not a.t_first:
            a.t_first = time.perf_counter()
        a.tokens.append(token)
        if token in backend.info.eog_tokens:
            self._finish(backend, active, free, a, FinishReason.STOP)
            return
        a.n_generated += 1
        text = a.detok.feed(token)
        if a.stops is not None:
            text = a.stops.feed(text)
        a.text.append(text)
        lp = None
        if logits is not None and a.logprobs is not None:
            lp = token_logprob(logits, token, a.logprobs, backend.token_to_piece)
        a.handle._emit(TokenEvent(token, text, lp))
        if a.stops is not None and a.stops.matched is not None:
            self._finish(backend, active, free, a, FinishReason.STOP)
        elif a.n_generated >= a.max_tokens:
            self._finish(backend, active, free, a, FinishReason.LENGTH)

    def _finish(
        self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs, a: _Active, reason: FinishReason
    ) -> None:
        link = self.link if a.use_cache else None
        save = link is not None and link.final_allowed(len(a.tokens))
        if link is not None and save and a.fed < len(a.tokens):
            # The reply is over: its end goes out now. The sequence closes with the next tick (its last sampled
            # token decoded along with the other sequences' tokens, then the whole context saved and the sequence
            # freed). Until then its finish row is reserved, so a parent_key resume or a drain waits for it.
            a.closing = reason
            a.t_closing = time.monotonic()
            a.reserved = link.reserve(a.tokens)
            key = self._announce(a, reason, committed=len(a.tokens))
            if a.reserved and key is not None:
                self._finishing[key] = (tuple(a.tokens), a.n_prompt)
            return
        self._complete(backend, active, free, a, reason, save=save)

    def _close(
        self, backend: ModelBackend, active: dict[int, _Active], free: _FreeSeqs, closing: list[_Active]
    ) -> None:
        """Close these closing sequences now, in a decode of their own (not waiting for the next tick)."""
        if not closing:
            return
        _release_held()
        try:
            backend.decode([DecodeItem(a.seq_id, [a.tokens[a.fed]], logits=False) for a in closing])
        except Exception as exc:  # a failed decode is the worker's fault, even when a request's admission ran it
            raise _WorkerFault from exc
        for a in closing:
            a.fed += 1
            self._complete(backend, active, free, a, a.closing or FinishReason.STOP, save=True)

    def _complete(
        self,
        backend: ModelBackend,
        active: dict[int, _Active],
        free: _FreeSeqs,
        a: _Active,
        reason: FinishReason,
        *,
        save: bool,
    ) -> None:
        """Free the sequence, after saving its context when ``save``; announce the end unless it went out when the
        sequence began closing."""
        del active[a.seq_id]
        link = self.link if a.use_cache else None
        saved = False
        if link is not None and save and reason is not FinishReason.CANCELLED and a.fed > a.last_save:
            key = link.save(backend, a.seq_id, a.tokens[: a.fed], SaveReason.FINISH, reserved=a.reserved)
            self._finishing[key] = (tuple(a.tokens[: a.fed]), a.n_prompt)
            saved = True
        if a.reserved and not saved and self.link is not None:
            self.link.release(a.tokens)
        backend.seq_truncate(a.seq_id, 0)
        free.give(a.seq_id)
        self.in_flight = len(active)
        if a.closing is None:  # announced after the sequence is free: whoever sees the end can count on it
            self._announce(a, reason, committed=a.fed)

    def _announce(self, a: _Active, reason: FinishReason, *, committed: int) -> CacheKey | None:
        """Send the request's end: the final DoneEvent (after a last text event for held-back stop text); returns
        its finish key. ``committed``: how many of its tokens the sequence holds, or will once it has closed."""
        link = self.link if a.use_cache else None
        finish_key: CacheKey | None = None
        if link is not None and reason is not FinishReason.CANCELLED:
            context = a.tokens[:committed]
            finish_key = link.key(context)
            link.remember(finish_key, context)
        # Bytes of a character the reply was cut inside are dropped: the reply ends before it, streamed or not.
        a.detok.reset()
        tail = a.stops.flush() if a.stops is not None else ""
        if tail:
            a.text.append(tail)
        stop_sequence = a.stops.matched if a.stops is not None else None
        if stop_sequence is not None and reason is FinishReason.LENGTH:
            reason = FinishReason.STOP  # the last tokens completed a stop sequence
        now = time.perf_counter()
        first = a.t_first or now
        done = DoneEvent(
            reason,
            tuple(a.tokens[a.n_prompt : a.n_prompt + a.n_generated]),
            "".join(a.text),
            a.n_prompt,
            first - a.t_start,
            now - first,
            stop_sequence,
            context_tokens=tuple(a.tokens),
            committed_tokens=committed,
            finish_key=finish_key,
            cache_hit=a.hit.kind,
            restored_tokens=a.hit.prefix_len,
            prefilled_tokens=min(committed, a.n_prompt) - a.hit.prefix_len,
        )
        if tail:
            a.handle._emit(TokenEvent(-1, tail))  # so that the streamed text adds up to the reply
        a.handle._emit(done)
        return finish_key
