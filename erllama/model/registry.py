"""``Registry``: the loaded models of a process, by id, each under its own supervisor — the one map of them.

Ids are explicit or generated (``model-1``, ``model-2``, ...); loading an id twice is an error. Unloading stops the
supervisor, which stops the worker, which closes the backend on its own thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Callable

from erllama.errors import ModelExistsError, UnknownModelError
from erllama.model.adapters import AdapterSet
from erllama.model.backend import ModelBackend
from erllama.model.config import WorkerConfig
from erllama.model.supervisor import ModelStatus, Supervisor

__all__ = ["LoadedModel", "Registry"]


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    """A loaded model: its supervisor, the file it was loaded from (None for a custom backend), its adapters."""

    supervisor: Supervisor
    path: str | None = None
    adapters: AdapterSet = dataclasses.field(default_factory=AdapterSet)


class Registry:
    """Thread-safe map of model id -> :class:`LoadedModel`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._ids = itertools.count(1)

    def load(
        self,
        backend_factory: Callable[[], ModelBackend],
        model_id: str | None = None,
        *,
        max_restarts: int = 3,
        window_s: float = 60.0,
        worker_config: WorkerConfig | None = None,
        path: str | None = None,
        adapters: AdapterSet | None = None,
    ) -> str:
        """Start a supervised worker for the model; returns its id. ``path`` and ``adapters`` are recorded with it
        (``adapters``: the set its worker config's adapter provider reads)."""
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
            self._models[model_id] = LoadedModel(sup, path, adapters or AdapterSet())
        try:
            sup.start()
        except BaseException:
            with self._lock:
                self._models.pop(model_id, None)
            raise
        return model_id

    def entry(self, model_id: str) -> LoadedModel:
        with self._lock:
            entry = self._models.get(model_id)
        if entry is None:
            raise UnknownModelError(f"no model with id {model_id!r} is loaded")
        return entry

    def get(self, model_id: str) -> Supervisor:
        return self.entry(model_id).supervisor

    def unload(self, model_id: str) -> None:
        with self._lock:
            entry = self._models.pop(model_id, None)
        if entry is None:
            raise UnknownModelError(f"no model with id {model_id!r} is loaded")
        entry.supervisor.stop()

    def entries(self) -> dict[str, LoadedModel]:
        with self._lock:
            return dict(self._models)

    def list(self) -> dict[str, ModelStatus]:
        with self._lock:
            return {model_id: entry.supervisor.status for model_id, entry in self._models.items()}

    def shutdown(self) -> None:
        """Unload every model."""
        for model_id in list(self.list()):
            with contextlib.suppress(UnknownModelError):
                self.unload(model_id)
