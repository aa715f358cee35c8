"""Decoding loops shared by the integration tests.

The cold path decodes the prompt minus its last token as one batch (chunked by n_batch), then the last prompt
token alone; a warm path restores the state of ``prompt[:-1]`` and decodes that same last token alone. Both therefore
compute the first generated token's logits from the same one-token batch over the same KV contents, which is what
makes exact warm/cold equality a fair thing to demand.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from erllama._native import Batch, Context, Sampler
from erllama.model import LlamaBackend


def step(ctx: Context, token: int, seq_id: int = 0) -> int:
    """Decode one token at the end of a sequence; returns its logits row."""
    batch = Batch(1)
    batch.add(token, ctx.seq_len(seq_id), seq_id, logits=True)
    ctx.decode(batch)
    return 0


def continue_greedy(
    ctx: Context, sampler: Sampler, pending: int, n: int, seq_id: int = 0
) -> tuple[list[int], npt.NDArray[np.float32]]:
    """Decode ``pending`` (a token not yet in the KV cache), then generate n tokens.

    Returns the generated tokens and the logits the first of them was sampled from.
    """
    row = step(ctx, pending, seq_id)
    first_logits = ctx.logits(row)
    out = []
    for _ in range(n):
        token = sampler.sample(ctx, row)
        out.append(token)
        row = step(ctx, token, seq_id)
    return out, first_logits


def cold_run(
    ctx: Context, sampler: Sampler, prompt: Sequence[int], n: int, seq_id: int = 0
) -> tuple[list[int], npt.NDArray[np.float32]]:
    """Prefill prompt[:-1], then continue greedily from the last prompt token."""
    ctx.decode_tokens(prompt[:-1], seq_id, logits_last=False)
    return continue_greedy(ctx, sampler, prompt[-1], n, seq_id)


class Recording(LlamaBackend):
    """A LlamaBackend that keeps a copy of the logits every token was sampled from (in order)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sampled_from: list[npt.NDArray[np.float32]] = []

    def sample(self, seq_id: int, row: int) -> int:
        self.sampled_from.append(self.context.logits(row))
        return super().sample(seq_id, row)

    def sample_rows(self, picks: Sequence[tuple[int, int]]) -> list[int]:
        self.sampled_from.extend(self.context.logits(row) for _, row in picks)
        return super().sample_rows(picks)
