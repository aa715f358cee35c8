"""How a model worker forms its steps: the constants of the batching rules, named in one value.

The worker (``erllama.model.worker``) reads them; tests and benchmarks pass their own instead of patching module
constants. docs/runtime.md explains why each rule exists and how its value was measured.
"""

from __future__ import annotations

import dataclasses

from erllama.errors import InvalidInputError

__all__ = ["BatchingConfig"]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchingConfig:
    """The batching rules' constants.

    Attributes:
        batch_wait_s: dynamic batching: the longest a tick that only prefills newly admitted prompts (with room left
            in the batch) waits for more requests to join it; 0 never waits.
        gather_share: ... and at most this share of that tick's estimated time (1%: invisible in service time).
        min_cut_chunk: a prefill chunk the batch budget cuts shorter than this waits for the next tick when other
            prompts are already in the batch: llama.cpp splits a batch into micro-batches of equal tokens per
            sequence, so a short extra chunk costs a whole extra pass over the weights for a few tokens.
        close_grace_s: a reply that ended closes (its last token decoded, its row saved) riding along with other
            sequences' rows, or alone after this long without a new request, which then goes first.
    """

    batch_wait_s: float = 0.005
    gather_share: float = 0.01
    min_cut_chunk: int = 64
    close_grace_s: float = 0.02

    def __post_init__(self) -> None:
        if not (self.batch_wait_s >= 0 and self.gather_share >= 0 and self.close_grace_s >= 0):
            raise InvalidInputError("batching waits and shares must be >= 0")
        if self.min_cut_chunk < 1:
            raise InvalidInputError("min_cut_chunk must be >= 1")
