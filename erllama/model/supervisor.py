"""``Supervisor``: keeps one model's worker running, restarting it after a crash within a restart intensity.

Like OTP's one_for_one: a worker that dies with an error (an exception escaping its loop, a native error) is
restarted, unless it has already been restarted ``max_restarts`` times within ``window_s`` seconds, in which case
the model is reported FAILED and stays down instead of looping. Requests of the crashed worker get an error
event, never a hang; requests submitted while the model is failed get one at once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from erllama.errors import InvalidInputError, WorkerStoppedError
from erllama.model.backend import ModelBackend
from erllama.model.config import WorkerConfig
from erllama.model.delivery import RequestHandle
from erllama.model.request import GenerateRequest
from erllama.model.worker import ModelWorker

__all__ = ["ModelStatus", "Supervisor"]

log = logging.getLogger("erllama.supervisor")


class ModelStatus(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class Supervisor:
    """Runs ``ModelWorker(backend_factory)`` and restarts it on crashes."""

    def __init__(
        self,
        backend_factory: Callable[[], ModelBackend],
        *,
        name: str = "model",
        max_restarts: int = 3,
        window_s: float = 60.0,
        worker_config: WorkerConfig | None = None,
    ) -> None:
        """``worker_config`` is what every :class:`ModelWorker` it starts runs with (cache, policy, adapters, ...)."""
        if max_restarts < 0 or window_s <= 0:
            raise InvalidInputError("max_restarts must be >= 0 and window_s > 0")
        self.name = name
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._factory = backend_factory
        self._worker_config = worker_config or WorkerConfig()
        self._lock = threading.Lock()
        self._restarts: deque[float] = deque()
        self.restart_count = 0
        self.last_error: BaseException | None = None
        self.status = ModelStatus.STOPPED
        self._worker: ModelWorker | None = None

    def start(self) -> None:
        """Start the first worker (a load failure is raised here, not retried)."""
        with self._lock:
            self._worker = self._new_worker()
            self._worker.start()
            self.status = ModelStatus.RUNNING

    def _new_worker(self) -> ModelWorker:
        return ModelWorker(self._factory, self._worker_config, name=self.name, on_exit=self._on_exit)

    def _on_exit(self, crash: BaseException | None) -> None:
        # Runs on the dying worker's thread, after its requests were failed and its backend closed.
        if crash is None:
            return
        with self._lock:
            if self.status is ModelStatus.STOPPED:
                return
            self.last_error = crash
            now = time.monotonic()
            while self._restarts and now - self._restarts[0] > self.window_s:
                self._restarts.popleft()
            if len(self._restarts) >= self.max_restarts:
                log.error("model %s failed: %d restarts within %.0fs", self.name, len(self._restarts), self.window_s)
                self.status = ModelStatus.FAILED
                return
            self._restarts.append(now)
            self.restart_count += 1
            self.status = ModelStatus.RESTARTING
        worker = self._new_worker()
        try:
            worker.start()
        except Exception as exc:  # noqa: BLE001 - a reload that fails leaves the model failed, with the reason
            with self._lock:
                self.last_error = exc
                self.status = ModelStatus.FAILED
            return
        with self._lock:
            if self.status is ModelStatus.RESTARTING:
                self._worker = worker
                self.status = ModelStatus.RUNNING
                return
        worker.stop()  # stopped while we were restarting

    def submit(self, request: GenerateRequest) -> RequestHandle:
        """Forward to the running worker; an immediate error event when the model is failed or stopped."""
        with self._lock:
            worker = self._worker if self.status is ModelStatus.RUNNING else None
            status = self.status
        if worker is None:
            handle = RequestHandle(0)
            handle.fail(WorkerStoppedError(f"model {self.name} is {status.value}"))
            return handle
        return worker.submit(request)

    def running_worker(self) -> ModelWorker:
        """The running worker, or WorkerStoppedError naming the model's status."""
        with self._lock:
            worker = self._worker if self.status is ModelStatus.RUNNING else None
            status = self.status
        if worker is None:
            raise WorkerStoppedError(f"model {self.name} is {status.value}")
        return worker

    @property
    def worker(self) -> ModelWorker | None:
        return self._worker

    def stop(self) -> None:
        with self._lock:
            self.status = ModelStatus.STOPPED
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
