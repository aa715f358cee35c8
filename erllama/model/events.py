"""What a request hears from its worker: the event types, the request's phase and the reasons a reply ends.

A running request's events are, in order: one :class:`AdmittedEvent` (it passed its checks and holds a sequence),
:class:`TokenEvent` per reply token, then one final :class:`DoneEvent`. A request that fails at any point gets an
:class:`ErrorEvent` instead, as its final event.
"""

from __future__ import annotations

import dataclasses
import enum

from erllama.cache.counters import HitKind
from erllama.cache.key import CacheKey
from erllama.cache.report import CacheReport
from erllama.model.backend import TokenLogprob

__all__ = [
    "AdmittedEvent",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "FinishReason",
    "Phase",
    "TokenEvent",
]


class Phase(enum.Enum):
    """What a worker's last step did."""

    IDLE = "idle"
    PREFILLING = "prefilling"
    GENERATING = "generating"


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-generation token or a stop sequence
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEvent:
    """A reply token and the text it completes (possibly empty). ``token`` is -1 for text released only at the end
    (held back while it could still have begun a stop sequence)."""

    token: int
    text: str
    logprob: TokenLogprob | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DoneEvent:
    """The end of a request: the reply, the context it leaves in the KV cache, and how it was served.

    ``context_tokens`` is the whole context the request ended with (prompt, generated tokens and the end token
    that stopped it), ``committed_tokens`` how many of them are in the KV cache (and in the finish save, whose key is
    ``finish_key`` — pass it as ``parent_key`` to continue). ``cache_hit`` says how the prompt was found.
    """

    finish_reason: FinishReason
    tokens: tuple[int, ...]
    text: str  # the reply as streamed: a matched stop sequence is trimmed
    prompt_tokens: int
    prefill_s: float
    generate_s: float
    stop_sequence: str | None = None
    context_tokens: tuple[int, ...] = ()
    committed_tokens: int = 0
    finish_key: CacheKey | None = None
    cache_hit: HitKind = HitKind.COLD
    restored_tokens: int = 0
    prefilled_tokens: int = 0
    cache: CacheReport | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AdmittedEvent:
    """The request passed every check and holds a sequence: the first event of a request that runs (a request that
    fails its checks gets an ErrorEvent instead). ``prompt_tokens`` is its whole context, ``restored_tokens`` what
    the cache restored of it, ``max_tokens`` the reply length it may reach (after ``fit_context``)."""

    prompt_tokens: int
    restored_tokens: int
    max_tokens: int
    cache_hit: HitKind = HitKind.COLD
    cache: CacheReport | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: BaseException


Event = AdmittedEvent | TokenEvent | DoneEvent | ErrorEvent
