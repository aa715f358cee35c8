"""``GenerateRequest``: one generation request, built once by the runtime and passed down unchanged (supervisor,
worker, its queue); the request's parameters are written in this one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from erllama.cache.key import CacheKey
from erllama.errors import InvalidInputError
from erllama.sampling import SamplerConfig

__all__ = ["GenerateRequest"]


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateRequest:
    """What to generate. Checked on creation (a bad request never reaches a worker).

    Attributes:
        prompt: a text (tokenized on the worker, special tokens parsed, BOS added unless it continues a parent) or
            token ids.
        max_tokens: the reply's length limit; None lets it use what the context leaves; 0 only prefills (and saves)
            the prompt.
        sampling: how each token is picked.
        stop: the reply ends at the first of these texts (which is cut off).
        parent_key: a previous request's ``finish_key``: the prompt continues that request's context.
        use_cache: restore from and save to the cache.
        logprobs: report each reply token's log-probability and this many alternatives (None: not at all).
        fit_context: a ``max_tokens`` beyond what the context leaves is lowered to it instead of refused.
        thinking: split ``<think>`` ... ``</think>`` text out of the reply (read by the runtime's stream).
        save_at: where the prompt is also saved while prefilling (a client's cache breakpoints): offsets in a text
            prompt (the worker maps each to the tokens of the text before it), or positions in a token prompt.
    """

    prompt: str | Sequence[int]  # stored as a tuple of ints
    max_tokens: int | None = 128
    sampling: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    stop: Sequence[str] = ()  # stored as a tuple
    parent_key: CacheKey | None = None
    use_cache: bool = True
    logprobs: int | None = None
    fit_context: bool = False
    thinking: bool = False
    save_at: Sequence[int] = ()  # stored as a sorted tuple

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "save_at", tuple(sorted({int(p) for p in self.save_at})))
        if any(p < 0 or p > len(self.prompt) for p in self.save_at):
            raise InvalidInputError("save_at points must lie within the prompt")
        if not self.prompt:
            raise InvalidInputError("a request needs at least one prompt token")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise InvalidInputError("max_tokens must be >= 0")
        if any(not s for s in self.stop):
            raise InvalidInputError("stop sequences must not be empty")
        if self.logprobs is not None and self.logprobs < 0:
            raise InvalidInputError("logprobs must be >= 0")
