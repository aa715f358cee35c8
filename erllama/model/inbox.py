"""``Inbox``: what other threads hand a model worker — requests, calls to run on its thread, the stop flag — and
the worker's waits for them. The one lock between the worker thread and everyone else."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from erllama.model.backend import ModelBackend
from erllama.model.sequences import FreeSeqs, Waiting

__all__ = ["Call", "Inbox"]

Call = tuple[Callable[[ModelBackend], Any] | None, Callable[[ModelBackend, int], Any] | None, int, "Future[Any]"]
"""A call taken off the inbox: ``(fn, None, -1, future)``, or ``(None, seq_fn, seq_id, future)`` with a sequence."""


class Inbox:
    """Requests wait here in arrival order (a parked one goes back to the head); calls run before requests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: deque[Waiting] = deque()
        self._calls: deque[tuple[Callable[[ModelBackend], Any], Future[Any]]] = deque()
        self._seq_calls: deque[tuple[Callable[[ModelBackend, int], Any], Future[Any]]] = deque()
        self._stopped = threading.Event()
        self._nudged = False  # a row a parked request waits for settled
        self.admitting: Waiting | None = None  # off the queue, not running yet: answered too if the worker dies

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    # -- other threads ---------------------------------------------------------------------------------------------

    def put(self, w: Waiting, *, running: bool) -> bool:
        """Queue a request; False (not queued) when the worker is not ``running`` or stops. Checked under the lock
        the worker drains the queue with, so no request can slip in after the drain."""
        with self._cond:
            if self._stopped.is_set() or not running:
                return False
            self._requests.append(w)
            self._cond.notify()
        return True

    def call(self, fn: Callable[..., Any], *, with_seq: bool, running: bool) -> Future[Any] | None:
        """Queue a call; its future, or None when the worker is not ``running`` or stops."""
        future: Future[Any] = Future()
        with self._cond:
            if self._stopped.is_set() or not running:
                return None
            (self._seq_calls if with_seq else self._calls).append((fn, future))
            self._cond.notify()
        return future

    def stop(self) -> None:
        """Refuse what comes from now on and wake the worker."""
        with self._cond:
            self._stopped.set()
            self._cond.notify()

    def nudge(self) -> None:
        """Wake the worker: a row a parked request waits for is settled (called on a writer thread)."""
        with self._cond:
            self._nudged = True
            self._cond.notify()

    # -- the worker thread -------------------------------------------------------------------------------------------

    def next_request(self) -> Waiting | None:
        """The first queued request (it is ``admitting`` until :meth:`admitted`), or None."""
        with self._cond:
            if not self._requests:
                return None
            w = self.admitting = self._requests.popleft()
            return w

    def admitted(self) -> None:
        self.admitting = None

    def park(self, parked: Iterable[Waiting]) -> None:
        """Put requests back at the head of the queue, in their order."""
        with self._cond:
            self._requests.extendleft(reversed(list(parked)))

    def next_call(self, free: FreeSeqs) -> Call | None:
        """The next call to run: a plain one first, else one that needs a sequence while one is free."""
        with self._cond:
            if self._calls:
                fn, future = self._calls.popleft()
                return fn, None, -1, future
            if self._seq_calls and free:
                seq_fn, future = self._seq_calls.popleft()
                return None, seq_fn, free.take(), future
            return None

    def wait_idle(self, timeout_s: float, *, parked: bool) -> None:
        """Nothing to run: wait for work, up to ``timeout_s``. With requests ``parked``, wait for the row they need
        (a nudge) and at the latest until the first of them stops waiting."""
        with self._cond:
            idle = (parked or not self._requests) and not self._calls and not self._seq_calls
            if idle and not self._stopped.is_set() and not self._nudged:
                if parked:
                    now = time.monotonic()
                    timeout_s = min([timeout_s, *(max(w.deadline - now, 0.0) + 0.001 for w in self._requests)])
                self._cond.wait(timeout_s)
            self._nudged = False

    def wait_for_request(self, deadline: float) -> bool:
        """Wait until a request is queued (True) or ``deadline`` (``time.perf_counter``) passes; False at once when
        calls are waiting or the worker stops."""
        with self._cond:
            while not self._requests:
                left = deadline - time.perf_counter()
                if left <= 0 or self._calls or self._seq_calls or self._stopped.is_set():
                    return False
                self._cond.wait(left)
            return True

    def wait_grace(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for anything to do (a request, a call, a stop); False, without waiting, when
        something is there already."""
        with self._cond:
            if self._requests or self._calls or self._seq_calls or self._stopped.is_set():
                return False
            self._cond.wait(timeout_s)
            return True

    def drain(self) -> tuple[list[Waiting], list[Future[Any]]]:
        """Stop, and take everything still queued (the request being admitted first) to be answered."""
        with self._cond:
            self._stopped.set()
            waiting = list(self._requests)
            if self.admitting is not None:
                waiting.insert(0, self.admitting)
                self.admitting = None
            self._requests.clear()
            futures = [f for _, f in self._calls] + [f for _, f in self._seq_calls]
            self._calls.clear()
            self._seq_calls.clear()
        return waiting, futures
