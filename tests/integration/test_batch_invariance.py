"""Batch invariance: whether a token's logits depend on the batch it was decoded in, and that the build says so.

A ``--deterministic`` CPU build (llamafile's sgemm off) is batch-invariant: every cache hit (exact, longest-prefix,
parent_key resume) then reproduces the cold run bit for bit, although a restored sequence's K/V were computed in
other batches (one token per generation step, chunks cut elsewhere, other sequences riding along) than a cold run
would use. The default build keeps llama.cpp's stock kernels: sgemm serves batches of two or more rows, ggml's
vec_dot one-row products, and the two sum in different orders, so one-token steps and a chunk differ by rounding
(measured on SmolLM2 Q4_1: up to ~2% of the logit range; the tolerance below is 5%). Exact and parent_key hits stay
bit-identical there too, because cold and warm paths decode the last prompt token alone (test_runtime_llama.py).
scripts/test runs the integration suite on both kinds of build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from erllama._native import ContextConfig, library
from erllama.model import DecodeItem, LlamaBackend

pytestmark = pytest.mark.native


# Largest difference, as a fraction of the logits' range, between one-token steps and a chunk on a build that is
# not batch-invariant: rounding of two summation orders, amplified through the layers; a wrong kernel is O(1).
TOLERANCE = 5e-2


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
    if library().batch_invariant:
        assert np.array_equal(chunk, steps)
        assert np.array_equal(chunk, mixed)
    else:
        scale = float(np.abs(chunk).max())
        assert np.abs(chunk - steps).max() <= TOLERANCE * scale
        assert np.abs(chunk - mixed).max() <= TOLERANCE * scale


def test_a_batch_invariant_build_folds_the_last_prompt_token(model_path: Path) -> None:
    """The probe LlamaBackend runs at load (three decodes of one prompt) finds what the build promises."""
    if not library().batch_invariant:
        pytest.skip("the build under test keeps the stock kernels; scripts/test's second run is --deterministic")
    b = LlamaBackend(model_path, context_config=ContextConfig(n_ctx=512, n_batch=64))
    try:
        assert b.info.last_token_foldable
    finally:
        b.close()
