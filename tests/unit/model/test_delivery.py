"""Deliveries: a worker's outbox holds consumers' wake-ups until a flush point; other senders deliver at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from erllama.errors import WorkerStoppedError
from erllama.model import ErrorEvent, FlushPoint, Outbox, RequestHandle, TokenEvent


def on_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` on another thread (as the worker does) and wait for it."""
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def test_events_wait_for_the_flush_and_ride_one_wake_up() -> None:
    loop = asyncio.new_event_loop()
    try:
        handles = [RequestHandle(i) for i in range(3)]
        queues = [h.async_queue(loop) for h in handles]
        outbox = Outbox()

        def post() -> None:
            for h in handles:
                outbox.emit(h, TokenEvent(7, "x"))

        on_thread(post)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert all(q.empty() for q in queues), "held until a flush point"
        on_thread(lambda: outbox.flush(FlushPoint.DECODE))
        loop.run_until_complete(asyncio.sleep(0.05))
        assert [q.get_nowait() for q in queues] == [TokenEvent(7, "x")] * 3
        assert outbox.flushes == {FlushPoint.DECODE: 1}
    finally:
        loop.close()


def test_a_failure_from_another_thread_is_delivered_at_once() -> None:
    loop = asyncio.new_event_loop()
    try:
        handle = RequestHandle(1)
        queue = handle.async_queue(loop)
        error = WorkerStoppedError("stopped")
        on_thread(lambda: handle.fail(error))
        loop.run_until_complete(asyncio.sleep(0.05))
        assert queue.get_nowait() == ErrorEvent(error)
        on_thread(lambda: handle.fail(WorkerStoppedError("again")))
        loop.run_until_complete(asyncio.sleep(0.05))
        assert queue.empty(), "nothing after the final event"
    finally:
        loop.close()


def test_a_consumer_whose_loop_closed_cancels_its_request() -> None:
    loop = asyncio.new_event_loop()
    handle = RequestHandle(1)
    handle.async_queue(loop)
    loop.close()
    outbox = Outbox()

    def post_and_flush() -> None:
        outbox.emit(handle, TokenEvent(1, "a"))
        outbox.flush(FlushPoint.DECODE)  # the wake-up finds the loop closed

    on_thread(post_and_flush)
    on_thread(lambda: outbox.emit(handle, TokenEvent(2, "b")))
    assert handle.cancelled
