"""How events get from a worker thread to their consumers: :class:`RequestHandle`, the per-loop mailboxes and the
worker's :class:`Outbox`.

A handle delivers to a plain thread-safe queue, or — once switched with :meth:`RequestHandle.async_queue` — to an
asyncio queue through its event loop's one mailbox: the first post since the loop last drained wakes it (one
self-pipe write), later posts ride along, so N streams on one loop cost one wake-up per step, not N.

The worker does not wake loops as it produces events. It posts through its outbox, which holds the wake-ups until
one of the loop's named flush points (:class:`FlushPoint`): mostly right before the next decode, so consumers'
loops format and send a step's tokens while the decode runs in C without the GIL, instead of competing for the GIL
with the worker's sampling and batch building (every cffi call hands it over). Cache saves keep them held too (but
for a folded prompt's row, copied once its first token is out): a loop woken before a state copy takes the GIL while
the copy runs in C and keeps it, and the copy's return waits for it — finish saves took 3-13 ms that way against
1-2.5 ms held, with the other streams' next decode waiting on each. docs/runtime.md has the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import queue
import threading
import weakref
from collections import Counter
from collections.abc import Iterator

from erllama.errors import InvalidInputError, WorkerStoppedError
from erllama.model.events import DoneEvent, ErrorEvent, Event

__all__ = ["FlushPoint", "Outbox", "RequestHandle"]


class FlushPoint(enum.Enum):
    """Where the worker's loop wakes the consumers it holds deliveries for."""

    DECODE = "decode"  # right before a decode: the loops run while it holds no GIL
    CALL = "call"  # before a call on the worker thread (it may take a while)
    IDLE = "idle"  # before the worker waits for work, or for a closing's grace
    FIRST_TOKEN = "first_token"  # a folded prompt's first token, before its row is copied (off the TTFT)
    FINISH_ROWS = "finish_rows"  # before finish rows are copied, when the tokens out hold no one's next decode up
    CLOSE = "close"  # before closing sequences in a decode of their own


class _Mailbox:
    """Events bound for one event loop, delivered in batches (see the module's docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Event], Event]] = []
        self._closed = False  # a wake-up found the loop closed: every later post raises

    def post(self, aq: asyncio.Queue[Event], event: Event, outbox: Outbox | None) -> None:
        """Queue ``event`` for ``aq``; wake the loop now, or at ``outbox``'s next flush. Raises RuntimeError when
        the loop is closed."""
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
                return  # a drain is already scheduled, or held by an outbox
        if outbox is not None:
            outbox.hold(self)
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


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


class Outbox:
    """The wake-ups a worker holds between flush points. Owned by the worker's loop and used on its thread only;
    ``flushes`` counts them by point (for tests and profiling)."""

    def __init__(self) -> None:
        self._held: dict[_Mailbox, None] = {}
        self.flushes: Counter[FlushPoint] = Counter()

    def emit(self, handle: RequestHandle, event: Event) -> None:
        """Deliver ``event`` to ``handle``, its loop woken at the next flush."""
        handle.deliver(event, self)

    def hold(self, box: _Mailbox) -> None:
        self._held[box] = None

    def flush(self, point: FlushPoint) -> None:
        """Wake every loop a held delivery is bound for, now."""
        self.flushes[point] += 1
        if not self._held:
            return
        woken = list(self._held)
        self._held.clear()
        for box in woken:
            with contextlib.suppress(RuntimeError):  # a closed loop: its requests' next posts raise and cancel them
                box.wake()


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

    def fail(self, error: BaseException) -> None:
        """End the request with ``error`` (its final event), delivered at once; nothing if it has ended."""
        self.deliver(ErrorEvent(error), None)

    def deliver(self, event: Event, outbox: Outbox | None) -> None:
        """Deliver ``event`` (nothing after the final one); an asyncio consumer's loop is woken at ``outbox``'s
        next flush, or now without one. A consumer whose loop has closed is gone: the request is cancelled."""
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
            box.post(aq, event, outbox)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            self.cancel()
