"""Supervision: crash -> restart -> serves again; restart intensity exceeded -> failed, not looping."""

from __future__ import annotations

import time

import pytest

from erllama.errors import WorkerStoppedError
from erllama.model import ErrorEvent, FinishReason, StubBackend
from erllama.model.request import GenerateRequest
from erllama.model.supervisor import ModelStatus, Supervisor


def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)
    assert predicate(), "condition not reached in time"  # type: ignore[operator]


class CrashOnMarker(StubBackend):
    """Decoding the marker token (255 + 3) raises, as a native failure would."""

    MARKER = 258

    def decode(self, items):  # type: ignore[no-untyped-def]
        if any(self.MARKER in item.tokens for item in items):
            raise RuntimeError("injected crash")
        return super().decode(items)


def test_crash_restart_and_serve_again() -> None:
    sup = Supervisor(CrashOnMarker, name="m", max_restarts=3, window_s=60)
    sup.start()
    try:
        first = sup.worker
        crashed = sup.submit(GenerateRequest([5, CrashOnMarker.MARKER], max_tokens=3))
        events = list(crashed.events(timeout_s=10))
        assert isinstance(events[-1], ErrorEvent)
        assert isinstance(events[-1].error, WorkerStoppedError)
        assert "crashed (RuntimeError)" in str(events[-1].error)
        assert "injected crash" in str(events[-1].error.__cause__)
        wait_for(lambda: sup.status is ModelStatus.RUNNING and sup.worker is not first)
        assert sup.restart_count == 1
        assert (
            sup.submit(GenerateRequest([5, 6, 7], max_tokens=4)).result(timeout_s=10).finish_reason
            is FinishReason.LENGTH
        )
    finally:
        sup.stop()
    assert sup.status is ModelStatus.STOPPED


def test_restart_intensity_exceeded_reports_failed() -> None:
    sup = Supervisor(CrashOnMarker, name="m", max_restarts=2, window_s=60)
    sup.start()
    try:
        for _ in range(3):
            wait_for(lambda: sup.status in (ModelStatus.RUNNING, ModelStatus.FAILED))
            if sup.status is ModelStatus.FAILED:
                break
            dying = sup.worker
            handle = sup.submit(GenerateRequest([CrashOnMarker.MARKER], max_tokens=1))
            assert isinstance(list(handle.events(timeout_s=10))[-1], ErrorEvent)

            # the request's error goes out before the dying worker reports to its supervisor: wait for that, or
            # the next request would reach the dying worker (answered "stopped", not a crash of its own)
            def reported(w: object = dying) -> bool:
                return sup.worker is not w or sup.status.value == "failed"

            wait_for(reported)
        wait_for(lambda: sup.status is ModelStatus.FAILED)
        assert sup.restart_count == 2
        assert isinstance(sup.last_error, RuntimeError)
        late = sup.submit(GenerateRequest([5], max_tokens=1))
        with pytest.raises(WorkerStoppedError, match="failed"):
            late.result(timeout_s=1)
    finally:
        sup.stop()


def test_a_clean_stop_is_not_a_crash() -> None:
    sup = Supervisor(StubBackend, name="m")
    sup.start()
    sup.stop()
    assert sup.restart_count == 0
    with pytest.raises(WorkerStoppedError, match="stopped"):
        sup.submit(GenerateRequest([5], max_tokens=1)).result(timeout_s=1)
