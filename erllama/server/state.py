"""What every route of the daemon shares: the runtime, the served model names, limits."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from erllama.errors import UnknownModelError
from erllama.runtime import Runtime

__all__ = ["ServerConfig", "ServerState"]


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """Limits and access of the daemon.

    Attributes:
        api_key: when set, every request must carry it (``Authorization: Bearer`` or ``x-api-key``).
        max_body_bytes: larger request bodies are refused with 413.
        default_max_tokens: reply length when a request does not say.
    """

    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    default_max_tokens: int = 512


class ServerState:
    """The runtime and the names its models are served under (name -> runtime model id)."""

    def __init__(self, runtime: Runtime, models: Mapping[str, str], config: ServerConfig) -> None:
        self.runtime = runtime
        self._models = dict(models)
        self.config = config
        self.default_max_tokens = config.default_max_tokens
        self.started = int(time.time())

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def resolve(self, name: str) -> str:
        model_id = self._models.get(name)
        if model_id is None:
            raise UnknownModelError(f"The model '{name}' does not exist")
        return model_id
