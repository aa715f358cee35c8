"""Speculative decoding's check: score a draft in one forward pass (the runtime's ``verify``).

The caller drafts (``Runtime.draft_tokens``, or a smaller model) and asks the target model which prefix of the
draft it agrees with; this runs on the target's worker thread with a sequence of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from erllama.model.backend import DecodeItem, ModelBackend
from erllama.model.cachelink import CacheLink

__all__ = ["verify_draft"]


def verify_draft(
    backend: ModelBackend, seq_id: int, link: CacheLink | None, prefix: Sequence[int], draft: Sequence[int]
) -> tuple[int, int | None]:
    """How many tokens of ``draft`` the model accepts after ``prefix`` (its own greedy choice agrees) and its next
    token after them (None for an end-of-generation token). The prefix is restored from the cache where it can be,
    the rest prefilled in ``n_batch`` chunks; its last token and the draft are scored together in one decode."""
    toks = list(prefix)
    fed = link.restore(backend, seq_id, toks, None).prefix_len if link is not None else 0
    n_batch = backend.info.n_batch
    while fed < len(toks) - 1:
        chunk = toks[fed : min(len(toks) - 1, fed + n_batch)]
        backend.decode([DecodeItem(seq_id, chunk, logits=False)])
        fed += len(chunk)
    preds = backend.argmax_rows(seq_id, [toks[-1], *draft])
    accepted = 0
    while accepted < len(draft) and draft[accepted] == preds[accepted]:
        accepted += 1
    nxt = preds[accepted]
    return accepted, None if nxt in backend.info.eog_tokens else nxt
