"""How an exception of the one tree reaches a client: its kind, message and headers. Each dialect maps kinds to its
own status codes and envelope (a busy model is 429 in OpenAI's, 529 in Anthropic's, 503 in Ollama's)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from erllama.errors import (
    ErllamaError,
    InvalidInputError,
    OverloadedError,
    PromptTooLongError,
    SamplerError,
    UnknownCacheRowError,
    UnknownModelError,
    WorkerStoppedError,
)

__all__ = ["Failure", "FailureKind", "failure"]

FailureKind = Literal["not_found", "invalid", "busy", "stopped", "internal"]


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    message: str
    headers: dict[str, str] | None = None
    code: str | None = None  # a finer reason the dialects name (OpenAI's ``context_length_exceeded``)
    exc: BaseException | None = None


def failure(exc: BaseException) -> Failure:
    """The failure ``exc`` stands for; anything outside erllama's tree is re-raised (a bug, a 500)."""
    if isinstance(exc, UnknownModelError | UnknownCacheRowError):
        return Failure("not_found", str(exc))
    if isinstance(exc, PromptTooLongError):
        return Failure("invalid", str(exc), code="context_length_exceeded", exc=exc)
    if isinstance(exc, InvalidInputError | SamplerError):  # a sampler is built from the request's parameters
        return Failure("invalid", str(exc))
    if isinstance(exc, OverloadedError):
        return Failure("busy", str(exc), {"retry-after": str(max(1, round(exc.retry_after)))})
    if isinstance(exc, WorkerStoppedError):
        return Failure("stopped", str(exc), {"retry-after": "1"})
    if isinstance(exc, ErllamaError):
        return Failure("internal", str(exc))
    raise exc
