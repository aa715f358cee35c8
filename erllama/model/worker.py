"""``ModelWorker``: one thread that owns a backend for its whole life and serves requests by continuous batching.

Requests wait in a FIFO until a sequence slot is free. Every tick builds one batch: first the pending token of each
generating sequence (so streams keep flowing), then prefill chunks of prompting sequences in arrival order, up to
``n_batch`` tokens; a long prompt is spread over several ticks instead of freezing the others. After the decode,
each sequence that produced logits samples its next token, which is streamed as an event.

Other threads only enqueue requests, read events and set cancel flags; a cancel is observed at the next tick, i.e.
within one token or one prefill chunk, and frees the sequence. Phase, queue depth and in-flight count are plain
attributes published by the worker, so readers never wait on it.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from erllama._native.text import Detokenizer
from erllama.errors import InvalidInputError, WorkerStoppedError
from erllama.model.backend import DecodeItem, ModelBackend, SamplerConfig
from erllama.model.stop import StopMatcher

__all__ = [
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
    token: int
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class DoneEvent:
    finish_reason: FinishReason
    tokens: tuple[int, ...]
    text: str  # the reply as streamed: a matched stop sequence is trimmed
    prompt_tokens: int
    prefill_s: float
    generate_s: float
    stop_sequence: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: BaseException


Event = TokenEvent | DoneEvent | ErrorEvent


class RequestHandle:
    """The caller's side of a request: an event stream and a cancel switch (both usable from any thread)."""

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
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

    def _emit(self, event: Event) -> None:
        if self._finished.is_set():
            return
        if isinstance(event, DoneEvent | ErrorEvent):
            self._finished.set()
        self._events.put(event)


@dataclasses.dataclass(slots=True)
class _Active:
    handle: RequestHandle
    seq_id: int
    prompt: list[int]
    max_tokens: int
    detok: Detokenizer
    stops: StopMatcher | None = None
    fed: int = 0  # prompt tokens decoded so far
    pending: int | None = None  # sampled and streamed, not yet decoded
    generated: list[int] = dataclasses.field(default_factory=list)  # every streamed token
    text: list[str] = dataclasses.field(default_factory=list)
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    t_first: float = 0.0


@dataclasses.dataclass(slots=True)
class _Waiting:
    handle: RequestHandle
    prompt: list[int]
    max_tokens: int
    sampling: SamplerConfig
    stop: tuple[str, ...]


class ModelWorker:
    """Owns one backend on one thread; call :meth:`submit` from anywhere."""

    def __init__(
        self,
        backend_factory: Callable[[], ModelBackend],
        *,
        name: str = "model",
        idle_wait_s: float = 0.05,
        on_exit: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.name = name
        self._on_exit = on_exit
        self.crash: BaseException | None = None
        self._factory = backend_factory
        self._idle_wait_s = idle_wait_s
        self._inbox: deque[_Waiting] = deque()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.phase = Phase.IDLE
        self.in_flight = 0
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

    def submit(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int = 128,
        sampling: SamplerConfig | None = None,
        stop: Sequence[str] = (),
    ) -> RequestHandle:
        """Queue a request; events arrive on the returned handle. ``stop`` ends the reply at a stop sequence."""
        if not prompt:
            raise InvalidInputError("a request needs at least one prompt token")
        if max_tokens < 0:
            raise InvalidInputError("max_tokens must be >= 0")
        if any(not s for s in stop):
            raise InvalidInputError("stop sequences must not be empty")
        handle = RequestHandle(next(self._ids))
        with self._wake:
            # checked under the lock the worker drains the inbox with, so no request can slip in after the drain
            if self._stop.is_set() or not self._thread.is_alive():
                handle._emit(ErrorEvent(WorkerStoppedError(f"worker {self.name} is not running")))
                return handle
            self._inbox.append(_Waiting(handle, list(prompt), max_tokens, sampling or SamplerConfig(), tuple(stop)))
            self._wake.notify()
        return handle

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current tick, fail what is left, close the backend on its own thread."""
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- worker thread ---------------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            backend = self._factory()
        except Exception as exc:  # noqa: BLE001 - handed to start(), which re-raises it on the caller's thread
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        active: dict[int, _Active] = {}
        try:
            self._loop(backend, active)
        except Exception as exc:
            log.exception("worker %s crashed", self.name)
            self.crash = exc
            self._fail_all(active, exc)
        finally:
            with self._wake:
                self._stop.set()  # refuse new requests before draining the inbox
            self._fail_all(active, WorkerStoppedError(f"worker {self.name} stopped"))
            self.phase = Phase.IDLE
            try:
                backend.close()
            finally:
                if self._on_exit is not None:
                    self._on_exit(self.crash)

    def _fail_all(self, active: dict[int, _Active], exc: BaseException) -> None:
        for a in active.values():
            a.handle._emit(ErrorEvent(exc))
        active.clear()
        with self._wake:
            waiting = list(self._inbox)
            self._inbox.clear()
        for w in waiting:
            w.handle._emit(ErrorEvent(exc))
        self.in_flight = 0

    def _loop(self, backend: ModelBackend, active: dict[int, _Active]) -> None:
        info = backend.info
        free = deque(range(info.n_seq_max))
        while not self._stop.is_set():
            self._admit(backend, active, free)
            for seq_id in [s for s, a in active.items() if a.handle.cancelled]:
                self._finish(backend, active, free, seq_id, FinishReason.CANCELLED)
            if not active:
                self.phase = Phase.IDLE
                with self._wake:
                    if not self._inbox and not self._stop.is_set():
                        self._wake.wait(self._idle_wait_s)
                continue
            self._tick(backend, active, free)

    def _admit(self, backend: ModelBackend, active: dict[int, _Active], free: deque[int]) -> None:
        while free:
            with self._wake:
                if not self._inbox:
                    return
                waiting = self._inbox.popleft()
            if waiting.handle.cancelled:
                waiting.handle._emit(DoneEvent(FinishReason.CANCELLED, (), "", len(waiting.prompt), 0.0, 0.0))
                continue
            if len(waiting.prompt) + waiting.max_tokens > backend.info.n_ctx_seq:
                waiting.handle._emit(
                    ErrorEvent(
                        InvalidInputError(
                            f"prompt of {len(waiting.prompt)} tokens + max_tokens {waiting.max_tokens} exceeds the "
                            f"{backend.info.n_ctx_seq}-token context"
                        )
                    )
                )
                continue
            seq_id = free.popleft()
            backend.seq_truncate(seq_id, 0)
            backend.set_sampler(seq_id, waiting.sampling)
            matcher = StopMatcher(waiting.stop) if waiting.stop else None
            active[seq_id] = _Active(
                waiting.handle, seq_id, waiting.prompt, waiting.max_tokens, Detokenizer(backend), matcher
            )
            self.in_flight = len(active)

    def _tick(self, backend: ModelBackend, active: dict[int, _Active], free: deque[int]) -> None:
        budget = backend.info.n_batch
        items: list[DecodeItem] = []
        owners: list[_Active] = []
        for a in active.values():  # generating sequences first: one token each
            if a.pending is not None and budget > 0:
                items.append(DecodeItem(a.seq_id, [a.pending]))
                owners.append(a)
                budget -= 1
        prefilling = False
        for a in active.values():  # then prefill chunks, in arrival order
            if a.pending is None and a.fed < len(a.prompt) and budget > 0:
                chunk = a.prompt[a.fed : a.fed + budget]
                last = a.fed + len(chunk) == len(a.prompt)
                items.append(DecodeItem(a.seq_id, chunk, logits=last))
                owners.append(a)
                budget -= len(chunk)
                prefilling = True
        self.phase = Phase.PREFILLING if prefilling else Phase.GENERATING
        rows = backend.decode(items)
        self.ticks += 1
        for a, item, row in zip(owners, items, rows, strict=True):
            if a.pending is not None:
                a.pending = None  # now in the KV cache
            else:
                a.fed += len(item.tokens)
            if row is None:
                continue
            if len(a.generated) >= a.max_tokens:  # max_tokens == 0: prefill only
                self._finish(backend, active, free, a.seq_id, FinishReason.LENGTH)
                continue
            token = backend.sample(a.seq_id, row)
            if not a.t_first:
                a.t_first = time.perf_counter()
            if token in backend.info.eog_tokens:
                self._finish(backend, active, free, a.seq_id, FinishReason.STOP)
                continue
            a.generated.append(token)
            text = a.detok.feed(token)
            if a.stops is not None:
                text = a.stops.feed(text)
            a.text.append(text)
            a.handle._emit(TokenEvent(token, text))
            if a.stops is not None and a.stops.matched is not None:
                self._finish(backend, active, free, a.seq_id, FinishReason.STOP)
                continue
            if len(a.generated) >= a.max_tokens:
                self._finish(backend, active, free, a.seq_id, FinishReason.LENGTH)
                continue
            a.pending = token

    def _finish(
        self, backend: ModelBackend, active: dict[int, _Active], free: deque[int], seq_id: int, reason: FinishReason
    ) -> None:
        a = active.pop(seq_id)
        tail = a.detok.flush()
        if a.stops is not None:
            tail = a.stops.feed(tail) + a.stops.flush()
        now = time.perf_counter()
        first = a.t_first or now
        stop_sequence = a.stops.matched if a.stops is not None else None
        if stop_sequence is not None and reason is FinishReason.LENGTH:
            reason = FinishReason.STOP  # the last tokens completed a stop sequence
        text = "".join(a.text) + tail
        a.handle._emit(
            DoneEvent(reason, tuple(a.generated), text, len(a.prompt), first - a.t_start, now - first, stop_sequence)
        )
        backend.seq_truncate(seq_id, 0)
        free.append(seq_id)
        self.in_flight = len(active)
