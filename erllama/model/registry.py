"""``Registry``: the loaded models of a process, by id, each under its own supervisor.

Ids are explicit or generated (``model-1``, ``model-2``, ...); loading an id twice is an error. Unloading stops the
supervisor, which stops the worker, which closes the backend on its own thread.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable

from erllama.errors import ModelExistsError, UnknownModelError
from erllama.model.backend import ModelBackend
from erllama.model.config import WorkerConfig
from erllama.model.supervisor import ModelStatus, Supervisor

__all__ = ["Registry"]


class Registry:
    """Thread-safe map of model id -> Supervisor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Supervisor] = {}
        self._ids = itertools.count(1)

    def load(
        self,
        backend_factory: Callable[[], ModelBackend],
        model_id: str | None = None,
        *,
        max_restarts: int = 3,
        window_s: float = 60.0,
        worker_config: WorkerConfig | None = None,
    ) -> str:
        """Start a supervised worker for the model; returns its id."""
        with self._lock:
            if model_id is None:
                model_id = next(f"model-{n}" for n in self._ids if f"model-{n}" not in self._models)
            elif model_id in self._models:
                raise ModelExistsError(f"a model with id {model_id!r} is already loaded")
            sup = Supervisor(
                backend_factory,
                name=model_id,
                max_restarts=max_restarts,
                window_s=window_s,
                worker_config=worker_config,
            )
            self._models[model_id] = sup
        try:
            sup.start()
        except BaseException:
            with self._lock:
                self._models.pop(model_id, None)
            raise
        return model_id

    def get(self, model_id: str) -> Supervisor:
        with self._lock:
            sup = self._models.get(model_id)
        if sup is None:
            raise UnknownModelError(f"no model with id {model_id!r} is loaded")
        return sup

    def unload(self, model_id: str) -> None:
        with self._lock:
            sup = self._models.pop(model_id, None)
        if sup is None:
            raise UnknownModelError(f"no model with id {model_id!r} is loaded")
        sup.stop()

    def list(self) -> dict[str, ModelStatus]:
        with self._lock:
            return {model_id: sup.status for model_id, sup in self._models.items()}

    def shutdown(self) -> None:
        """Unload every model."""
        for model_id in list(self.list()):
            with contextlib.suppress(UnknownModelError):
                self.unload(model_id)
