"""Per-sequence state round trips: a restored sequence continues with exactly the tokens an uninterrupted one would.

Runs on the tiny generated model and on SmolLM2-135M-Instruct (Q4_1).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from erllama._native import Context, ContextConfig, Model, Sampler
from erllama.errors import StateError
from tests.integration.helpers import cold_run, continue_greedy

pytestmark = pytest.mark.native

TEXT = (
    "You are a helpful assistant. The cache keeps the prompt warm so the model does not compute it again. "
    "The quick brown fox jumps over the lazy dog, and the lazy dog was not amused. "
    "Hello world, 世界 🎉 — what would people like to know about the state of the llama? " * 3
)
N_GEN = 24
CFG = ContextConfig(n_ctx=1024, n_batch=64, n_ubatch=64)

# (state of prompt[:-1], greedy continuation, logits the first generated token was sampled from)
Reference = tuple[bytes, list[int], npt.NDArray[np.float32]]


@pytest.fixture(scope="module")
def prompt(model: Model) -> list[int]:
    tokens = model.tokenize(TEXT)
    assert len(tokens) > 2 * CFG.n_batch, "the prompt must span several prefill chunks"
    return tokens


@pytest.fixture(scope="module")
def reference(model: Model, prompt: list[int]) -> Reference:
    """The uninterrupted run, plus the state of prompt[:-1] saved on the way."""
    with Context(model, CFG) as ctx, Sampler(model) as sampler:
        ctx.decode_tokens(prompt[:-1], logits_last=False)
        state = bytes(ctx.state_seq_get(0))
        tokens, logits = continue_greedy(ctx, sampler, prompt[-1], N_GEN)
    return state, tokens, logits


def test_state_blob_is_sized_exactly(model: Model, prompt: list[int]) -> None:
    with Context(model, CFG) as ctx:
        ctx.decode_tokens(prompt, logits_last=False)
        blob = ctx.state_seq_get(0)
        assert len(blob) == ctx.state_seq_size(0)
        assert len(blob) > len(prompt) * model.info.n_layer  # it really carries the KV cells


def test_restore_into_fresh_context_is_token_identical(model: Model, prompt: list[int], reference: Reference) -> None:
    state, ref_tokens, ref_logits = reference
    with Context(model, CFG) as ctx, Sampler(model) as sampler:
        consumed = ctx.state_seq_set(state, 0)
        assert consumed == len(state)
        assert ctx.seq_len(0) == len(prompt) - 1
        tokens, logits = continue_greedy(ctx, sampler, prompt[-1], N_GEN)
    assert tokens == ref_tokens
    # Same KV contents, same one-token batch for the last prompt token: bit-identical, not merely close.
    assert np.array_equal(logits, ref_logits)


def _multi(n_seq: int, unified: bool) -> ContextConfig:
    return ContextConfig(
        n_ctx=n_seq * CFG.n_ctx, n_batch=CFG.n_batch, n_ubatch=CFG.n_ubatch, n_seq_max=n_seq, kv_unified=unified
    )


@pytest.mark.parametrize("unified", [False, True], ids=["per-seq-streams", "unified-kv"])
def test_restore_into_another_seq_of_a_multi_sequence_context(
    model: Model, prompt: list[int], reference: Reference, unified: bool
) -> None:
    """Save seq 0, restore into seq 2 of a fresh 4-sequence context whose other sequences are busy.

    A state blob records the KV layout's stream count, so blobs move between contexts of the same layout: with one
    stream per sequence, 4-sequence to 4-sequence; with a unified KV cache (one stream), even from a
    single-sequence context into a multi-sequence one.
    """
    _, ref_tokens, ref_logits = reference
    source_cfg = CFG if unified else _multi(4, unified=False)
    with Context(model, source_cfg) as ctx:
        ctx.decode_tokens(prompt[:-1], 0, logits_last=False)
        state = bytes(ctx.state_seq_get(0))
    with Context(model, _multi(4, unified)) as ctx, Sampler(model) as sampler:
        assert ctx.n_ctx_seq >= len(prompt) + N_GEN + 1
        ctx.decode_tokens(model.tokenize("an unrelated conversation about water"), 0)
        ctx.decode_tokens(prompt[: len(prompt) // 2], 3)
        ctx.state_seq_set(state, 2)
        assert ctx.seq_len(2) == len(prompt) - 1
        assert ctx.seq_len(1) == 0
        tokens, logits = continue_greedy(ctx, sampler, prompt[-1], N_GEN, seq_id=2)
        assert ctx.seq_len(3) == len(prompt) // 2, "restoring seq 2 must not touch seq 3"
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits)


def test_state_from_another_kv_layout_is_refused_cleanly(model: Model, reference: Reference) -> None:
    state, _, _ = reference
    with Context(model, _multi(2, unified=False)) as ctx:
        with pytest.raises(StateError, match="n_stream"):
            ctx.state_seq_set(state, 1)
        assert ctx.seq_len(1) == 0
        ctx.decode_tokens(model.tokenize("still works"), 1)


def test_state_saved_mid_generation_continues_identically(
    model: Model, prompt: list[int], reference: Reference
) -> None:
    _, ref_tokens, _ = reference
    k = N_GEN // 2
    with Context(model, CFG) as ctx, Sampler(model) as sampler:
        # prompt plus the first k generated tokens are in the cache; ref_tokens[k] is the pending token.
        ctx.decode_tokens(prompt + ref_tokens[: k - 1], logits_last=False)
        ctx.decode_tokens([ref_tokens[k - 1]])
        state = bytes(ctx.state_seq_get(0))
    with Context(model, CFG) as ctx, Sampler(model) as sampler:
        ctx.state_seq_set(state, 0)
        assert ctx.seq_len(0) == len(prompt) + k
        tail, _ = continue_greedy(ctx, sampler, ref_tokens[k], N_GEN - k - 1)
    assert tail == ref_tokens[k + 1 :]


def test_keep_first_k_and_redecode_the_rest(model: Model, prompt: list[int], reference: Reference) -> None:
    """seq_rm back to k tokens, decode the rest again: the continuation is the same.

    The re-decoded tokens go through the model in a different batch shape than the first time (one batch instead of
    the original chunk boundaries), and llama.cpp's CPU matmuls may round differently for different shapes, so their
    KV entries can differ in the last bits. The generated tokens must still be identical and the logits of the
    first one agree to a tight tolerance.
    """
    _, ref_tokens, ref_logits = reference
    with Context(model, CFG) as ctx, Sampler(model) as sampler:
        cold_tokens, _ = cold_run(ctx, sampler, prompt, 4)
        assert cold_tokens == ref_tokens[:4]
        for k in (len(prompt) // 3, len(prompt) - 5):
            ctx.seq_keep_first(0, k)
            assert ctx.seq_len(0) == k
            ctx.decode_tokens(prompt[k:-1], logits_last=False)
            tokens, logits = continue_greedy(ctx, sampler, prompt[-1], N_GEN)
            assert tokens == ref_tokens
            np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-3 * float(np.abs(ref_logits).max()))
            ctx.seq_keep_first(0, len(prompt) - 1)
