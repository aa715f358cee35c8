"""The save writer: a bounded pool that publishes rows off the caller's thread.

The caller (a model worker, mid-decode) hands over the packed state and returns at once. When every worker is busy
and the queue is full, the save is dropped and counted (``saves_dropped``) rather than stalling decoding. Evict and
shutdown saves take the synchronous path, which waits up to a timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from erllama.cache.counters import Counters
from erllama.errors import InvalidInputError

__all__ = ["SaveWriter"]


class SaveWriter:
    """At most ``max_pending`` saves in flight or queued, run by ``max_workers`` threads."""

    def __init__(self, counters: Counters, max_workers: int = 2, max_pending: int = 8) -> None:
        if max_workers < 1 or max_pending < max_workers:
            raise InvalidInputError("need max_workers >= 1 and max_pending >= max_workers")
        self._counters = counters
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="erllama-save")
        self._slots = threading.BoundedSemaphore(max_pending)

    def submit(self, job: Callable[[], bool], *, dropped: str = "saves_dropped") -> Future[bool] | None:
        """Queue a save; None (and the ``dropped`` counter + 1) when the writer is full."""
        if not self._slots.acquire(blocking=False):
            self._counters.incr(dropped)
            return None
        try:
            future = self._pool.submit(job)
        except RuntimeError:  # shut down
            self._slots.release()
            self._counters.incr(dropped)
            return None
        future.add_done_callback(lambda _f: self._slots.release())
        return future

    def run_sync(self, job: Callable[[], bool], timeout_s: float) -> bool:
        """Run a save on the pool and wait for it up to ``timeout_s``; False if it failed or did not finish."""
        if not self._slots.acquire(timeout=timeout_s):
            self._counters.incr("saves_dropped")
            return False
        try:
            future = self._pool.submit(job)
        except RuntimeError:
            self._slots.release()
            return False
        future.add_done_callback(lambda _f: self._slots.release())
        try:
            return bool(future.result(timeout=timeout_s))
        except TimeoutError:
            self._counters.incr("saves_sync_timeout")
            return False

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)
