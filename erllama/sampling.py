"""Sampling parameters as plain values: :class:`SamplerConfig` is what a request asks for, checked on creation; the
native binding (``erllama._native.sampler``) turns it into a llama.cpp sampler chain, the stub backend samples
with numpy. Pure Python: the server, the backend protocol and the stub import it without the native build."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from erllama.errors import InvalidInputError

__all__ = ["DEFAULT_SEED", "SamplerConfig"]

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per sampler


@dataclasses.dataclass(frozen=True, slots=True)
class SamplerConfig:
    """Sampling parameters. The defaults are greedy decoding.

    Attributes:
        temperature: <= 0 selects greedy decoding; otherwise the distribution is sharpened or flattened.
        top_k: keep the k most likely tokens (0 disables).
        top_p: nucleus sampling threshold (1.0 disables).
        min_p: drop tokens below min_p times the top probability (0.0 disables).
        typical_p: locally typical sampling (1.0 disables).
        repeat_penalty: divide logits of recent tokens (1.0 disables).
        frequency_penalty: subtract count * value from recent tokens' logits (0.0 disables).
        presence_penalty: subtract value from recent tokens' logits (0.0 disables).
        penalty_last_n: how many recent tokens the penalties look at (-1: the whole context).
        seed: RNG seed for the distribution draw (None: random).
        grammar: a GBNF grammar that constrains the output.
        grammar_root: the grammar's start rule.
        logit_bias: token id -> bias added to its logit.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    grammar: str | None = None
    grammar_root: str = "root"
    logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        floats = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty")
        for name in (*floats, "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidInputError(f"{name} must be a finite number")
        if not all(math.isfinite(b) or b == -math.inf for b in self.logit_bias.values()):
            raise InvalidInputError("logit_bias values must be finite numbers (or -inf to ban a token)")
        for name in ("top_k", "penalty_last_n"):
            if not -(2**31) <= getattr(self, name) < 2**31:
                raise InvalidInputError(f"{name} must fit in 32 bits")
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0 or not 0.0 < self.typical_p <= 1.0:
            raise InvalidInputError("top_p and min_p must be in [0, 1], typical_p in (0, 1]")
        if self.top_k < 0:
            raise InvalidInputError("top_k must be >= 0")
        if self.repeat_penalty <= 0.0:
            raise InvalidInputError("repeat_penalty must be > 0")
        if self.penalty_last_n < -1:
            raise InvalidInputError("penalty_last_n must be >= -1")
        if self.seed is not None and not 0 <= self.seed <= 0xFFFFFFFF:
            raise InvalidInputError("seed must fit in 32 bits")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
