"""The memory-pressure scheduler: poll samplers, and above a high watermark evict until under the low one.

Each poll reads every sampler. When a resource's usage fraction is at or above ``high``, the scheduler calls the
evict hooks registered for that resource (cache tiers, models' idle sequences, ...) in registration order, one
step at a time, re-sampling after each step, until usage is below ``low`` or no hook can free anything more.
A sampler or hook that fails is logged and counted; the scheduler keeps running. Off by default: nothing polls
until :meth:`PressureScheduler.start`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from erllama.errors import InvalidInputError
from erllama.pressure.sampler import MemorySampler

__all__ = ["EvictHook", "PressureConfig", "PressureReport", "PressureScheduler"]

log = logging.getLogger("erllama.pressure")

EvictHook = Callable[[int], int]
"""Asked to free about N bytes of a resource; returns the bytes it freed (0 when it has nothing left)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PressureConfig:
    """Watermarks as fractions of total, and the poll interval."""

    high: float = 0.90
    low: float = 0.80
    interval_s: float = 5.0
    max_steps: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.low < self.high <= 1.0:
            raise InvalidInputError("watermarks need 0 < low < high <= 1")
        if self.interval_s <= 0 or self.max_steps < 1:
            raise InvalidInputError("interval_s must be > 0 and max_steps >= 1")


@dataclasses.dataclass(frozen=True, slots=True)
class PressureReport:
    """What one poll saw and did for one resource."""

    resource: str
    used_bytes: int
    total_bytes: int
    evicted_bytes: int = 0
    error: str | None = None

    @property
    def fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0


class PressureScheduler:
    """Polls samplers and relieves pressure through evict hooks."""

    def __init__(self, samplers: list[MemorySampler], config: PressureConfig | None = None) -> None:
        self.config = config or PressureConfig()
        self._samplers = list(samplers)
        self._hooks: dict[str, list[tuple[str, EvictHook]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_reports: list[PressureReport] = []
        self.failures = 0

    def register(self, resource: str, name: str, hook: EvictHook) -> None:
        """Add an evict hook for a resource (``system``, ``nvidia``, ...)."""
        with self._lock:
            self._hooks.setdefault(resource, []).append((name, hook))

    def unregister(self, resource: str, name: str) -> None:
        with self._lock:
            self._hooks[resource] = [(n, h) for n, h in self._hooks.get(resource, []) if n != name]

    def poll_once(self) -> list[PressureReport]:
        """Sample every resource and evict where needed; returns one report per sampler."""
        reports = [self._relieve(sampler) for sampler in self._samplers]
        self.last_reports = reports
        return reports

    def _sample(self, sampler: MemorySampler) -> tuple[int, int] | str:
        try:
            return sampler.sample()
        except Exception as exc:  # noqa: BLE001 - a failing sampler is reported, never fatal
            self.failures += 1
            log.warning("memory sampler %s failed: %s", sampler.name, exc)
            return f"{type(exc).__name__}: {exc}"

    def _relieve(self, sampler: MemorySampler) -> PressureReport:
        sample = self._sample(sampler)
        if isinstance(sample, str):
            return PressureReport(sampler.name, 0, 0, error=sample)
        used, total = sample
        freed_total = 0
        with self._lock:
            hooks = list(self._hooks.get(sampler.name, []))
        if total <= 0 or used / total < self.config.high:
            return PressureReport(sampler.name, used, total)
        for _ in range(self.config.max_steps):
            target = used - int(self.config.low * total)
            if target <= 0:
                break
            freed = 0
            for name, hook in hooks:
                try:
                    freed = int(hook(target))
                except Exception as exc:  # noqa: BLE001 - one broken hook must not stop the others
                    self.failures += 1
                    log.warning("evict hook %s failed: %s", name, exc)
                    continue
                if freed > 0:
                    break
            if freed <= 0:
                break
            freed_total += freed
            sample = self._sample(sampler)
            if isinstance(sample, str):
                return PressureReport(sampler.name, used, total, freed_total, error=sample)
            used, total = sample
        return PressureReport(sampler.name, used, total, freed_total)

    # -- background polling ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Poll every ``interval_s`` on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="erllama-pressure", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
