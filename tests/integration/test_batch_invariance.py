"""The default CPU build is batch-invariant: a token's logits do not depend on the batch it was decoded in.

This is what makes every cache hit (exact, longest-prefix, parent_key resume) reproduce the cold run bit for bit:
a restored sequence's K/V were computed in other batches (one token per generation step, chunks cut elsewhere,
other sequences riding along) than a cold run would use. build_llama.py turns llamafile's sgemm off because it
served only batches of two or more tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from erllama._native import ContextConfig, library
from erllama.model import DecodeItem, LlamaBackend

pytestmark = pytest.mark.native


def test_the_default_build_is_batch_invariant() -> None:
    assert library().batch_invariant, "the default CPU build turns llamafile's sgemm off (build_llama.py)"


def test_logits_do_not_depend_on_the_batch_shape(model_path: Path) -> None:
    b = LlamaBackend(model_path, context_config=ContextConfig(n_ctx=2048, n_batch=256, n_seq_max=3))
    try:
        toks = b.tokenize("Tokens decoded in one chunk, one at a time, or beside other sequences. " * 6)
        body, last = toks[:80], toks[80]
        b.decode([DecodeItem(0, body, logits=False)])  # one chunk
        (r,) = b.decode([DecodeItem(0, [last])])
        assert r is not None
        chunk = b.context.logits(r)
        for t in body:  # one token per step
            b.decode([DecodeItem(1, [t], logits=False)])
        (r,) = b.decode([DecodeItem(1, [last])])
        assert r is not None
        steps = b.context.logits(r)
        b.seq_truncate(0, 0)
        b.decode([DecodeItem(0, body[:7], logits=False), DecodeItem(2, toks[:50], logits=False)])  # mixed batches
        b.decode([DecodeItem(0, body[7:], logits=False), DecodeItem(2, [toks[50]])])
        (r, _) = b.decode([DecodeItem(0, [last]), DecodeItem(2, [toks[51]])])
        assert r is not None
        mixed = b.context.logits(r)
    finally:
        b.close()
    assert np.array_equal(chunk, steps)
    assert np.array_equal(chunk, mixed)
