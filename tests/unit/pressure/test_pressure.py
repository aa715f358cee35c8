"""The pressure scheduler with fake samplers, and the NVIDIA sampler against a fake nvidia-smi on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from erllama.errors import InvalidInputError
from erllama.pressure import (
    CallableSampler,
    NvidiaSampler,
    PressureConfig,
    PressureScheduler,
    SamplerUnavailableError,
    SystemMemorySampler,
)

GIB = 1 << 30


class FakeMemory:
    """A resource whose usage drops by what the hooks free."""

    def __init__(self, used: int, total: int) -> None:
        self.used = used
        self.total = total

    def sample(self) -> tuple[int, int]:
        return self.used, self.total

    def hook(self, per_call: int, budget: list[int]) -> object:
        def evict(n: int) -> int:
            freed = min(per_call, n, budget[0])
            budget[0] -= freed
            self.used -= freed
            return freed

        return evict


def test_no_eviction_below_the_high_mark() -> None:
    mem = FakeMemory(85 * GIB, 100 * GIB)
    sched = PressureScheduler([CallableSampler("system", mem.sample)], PressureConfig(high=0.9, low=0.8))
    calls: list[int] = []
    sched.register("system", "cache", lambda n: calls.append(n) or 0)  # type: ignore[func-returns-value]
    (report,) = sched.poll_once()
    assert calls == []
    assert report.evicted_bytes == 0
    assert report.fraction == pytest.approx(0.85)


def test_evicts_above_high_until_under_low() -> None:
    mem = FakeMemory(95 * GIB, 100 * GIB)
    sched = PressureScheduler([CallableSampler("system", mem.sample)], PressureConfig(high=0.9, low=0.8))
    budget = [100 * GIB]
    sched.register("system", "cache", mem.hook(2 * GIB, budget))  # type: ignore[arg-type]
    (report,) = sched.poll_once()
    assert mem.used <= 80 * GIB
    assert mem.used > 77 * GIB, "it stops once under the low mark"
    assert report.evicted_bytes == 95 * GIB - mem.used


def test_falls_through_hooks_and_stops_when_nothing_is_left() -> None:
    mem = FakeMemory(99 * GIB, 100 * GIB)
    sched = PressureScheduler([CallableSampler("system", mem.sample)], PressureConfig(high=0.9, low=0.5))
    first, second = [3 * GIB], [2 * GIB]
    sched.register("system", "cache", mem.hook(GIB, first))  # type: ignore[arg-type]
    sched.register("system", "models", mem.hook(GIB, second))  # type: ignore[arg-type]
    (report,) = sched.poll_once()
    assert first == [0]
    assert second == [0]
    assert mem.used == 94 * GIB
    assert report.evicted_bytes == 5 * GIB


def test_failures_are_reported_not_fatal() -> None:
    def broken() -> tuple[int, int]:
        raise SamplerUnavailableError("no such device")

    mem = FakeMemory(95 * GIB, 100 * GIB)
    sched = PressureScheduler(
        [CallableSampler("gpu", broken), CallableSampler("system", mem.sample)], PressureConfig(high=0.9, low=0.8)
    )

    def bad_hook(n: int) -> int:
        raise RuntimeError("hook exploded")

    sched.register("system", "bad", bad_hook)
    sched.register("system", "good", mem.hook(GIB, [100 * GIB]))  # type: ignore[arg-type]
    gpu, system = sched.poll_once()
    assert gpu.error is not None
    assert "no such device" in gpu.error
    assert system.error is None
    assert mem.used <= 80 * GIB
    assert sched.failures >= 2


def test_background_polling_starts_and_stops() -> None:
    mem = FakeMemory(95 * GIB, 100 * GIB)
    sched = PressureScheduler([CallableSampler("system", mem.sample)], PressureConfig(interval_s=0.01))
    sched.register("system", "cache", mem.hook(GIB, [100 * GIB]))  # type: ignore[arg-type]
    sched.start()
    try:
        for _ in range(500):
            if mem.used < 90 * GIB:
                break
            import time

            time.sleep(0.01)
    finally:
        sched.stop()
    assert mem.used <= 80 * GIB


def test_bad_watermarks() -> None:
    with pytest.raises(InvalidInputError):
        PressureConfig(high=0.5, low=0.8)


def test_system_sampler_reads_this_machine() -> None:
    used, total = SystemMemorySampler().sample()
    assert 0 < used < total


def _fake_smi(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_nvidia_smi_is_parsed_and_summed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_smi(tmp_path, 'echo "1024, 81920"\necho "2048, 81920"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    used, total = NvidiaSampler(use_nvml=False).sample()
    assert (used, total) == (3072 << 20, 163840 << 20)


@pytest.mark.parametrize(
    ("body", "match"),
    [("exit 9\n", "failed"), ('echo "garbage"\n', "parse"), ("true\n", "no GPUs")],
)
def test_nvidia_smi_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, match: str) -> None:
    _fake_smi(tmp_path, body)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SamplerUnavailableError, match=match):
        NvidiaSampler(use_nvml=False).sample()


def test_no_nvidia_smi_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SamplerUnavailableError, match="not on PATH"):
        NvidiaSampler().sample()


def test_scheduler_with_fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "used"
    state.write_text("78000")
    _fake_smi(tmp_path, f'echo "$(cat {state}), 80000"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def evict(n: int) -> int:
        used = int(state.read_text())
        state.write_text(str(used - 1000))
        return 1000 << 20

    sched = PressureScheduler([NvidiaSampler(use_nvml=False)], PressureConfig(high=0.9, low=0.8))
    sched.register("nvidia", "kv", evict)
    (report,) = sched.poll_once()
    assert int(state.read_text()) <= 64000
    assert report.fraction <= 0.8
