"""Decoding: greedy output is deterministic across contexts and processes; samplers behave as configured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from erllama._native import Batch, Context, ContextConfig, Model, Sampler, sample_rows
from erllama.errors import InvalidInputError, SamplerError
from erllama.sampling import SamplerConfig
from tests.integration.helpers import cold_run, step

pytestmark = pytest.mark.native

PROMPT = "The capital of France is Paris. The capital of Japan is"
CFG = ContextConfig(n_ctx=512, n_batch=128)

_CHILD = """
import json, sys
from erllama._native import Context, ContextConfig, Model, Sampler
from tests.integration.helpers import cold_run
with Model(sys.argv[1]) as m, Context(m, ContextConfig(n_ctx=512, n_batch=128)) as c, Sampler(m) as s:
    tokens, _ = cold_run(c, s, m.tokenize(sys.argv[2]), 16)
print(json.dumps(tokens))
"""


def _greedy(model: Model, n: int = 16) -> list[int]:
    with Context(model, CFG) as ctx, Sampler(model) as sampler:
        tokens, _ = cold_run(ctx, sampler, model.tokenize(PROMPT), n)
    return tokens


def test_greedy_is_deterministic_across_contexts_and_processes(model: Model, model_path: Path) -> None:
    first = _greedy(model)
    assert _greedy(model) == first
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model_path), PROMPT], capture_output=True, text=True, check=True, cwd=root
    )
    assert json.loads(out.stdout) == first


def test_greedy_picks_the_argmax(model: Model) -> None:
    with Context(model, CFG) as ctx, Sampler(model) as sampler:
        row = ctx.decode_tokens(model.tokenize(PROMPT))
        logits = ctx.logits(row)
        assert sampler.sample(ctx, row) == int(np.argmax(logits))


def test_greedy_fast_path_picks_what_llamas_chain_picks(model: Model) -> None:
    # Greedy without grammar or penalties is computed in numpy (Sampler._argmax); llama.cpp's own chain
    # (logit_bias, then greedy) must agree on every row, with biases that ban, promote and tie tokens.
    with Context(model, CFG) as ctx:
        row = ctx.decode_tokens(model.tokenize(PROMPT))
        logits = ctx.logits(row)
        top = np.argsort(logits)[::-1]
        a, b, c = (int(t) for t in top[:3])
        tie = float(np.float32(logits[a]) - np.float32(logits[c]))  # c + tie rounds to a's logit, or near it
        biases: list[dict[int, float]] = [{}, {a: -1e9}, {a: -1e9, b: -1e9}, {c: 5.0}, {c: tie}, {b: tie, c: tie}]
        biases += [{int(t): -100.0 for t in top[:50]}, {0: 1e9}, {model.n_vocab - 1: 1e9, 0: 1e9}]
        for bias in biases:
            cfg = SamplerConfig(logit_bias=bias)
            with Sampler(model, cfg) as fast, Sampler(model, cfg) as chain:
                assert fast._argmax is not None
                chain._argmax = None  # force llama_sampler_sample
                assert fast.sample(ctx, row) == chain.sample(ctx, row), bias
    with Context(model, CFG) as ctx, Sampler(model) as fast, Sampler(model) as chain:
        chain._argmax = None
        row = ctx.decode_tokens(model.tokenize(PROMPT))
        for _ in range(32):  # along a generated continuation
            token = chain.sample(ctx, row)
            assert fast.sample(ctx, row) == token
            row = step(ctx, token)
    with Sampler(model, SamplerConfig(repeat_penalty=1.1)) as penalised:
        assert penalised._argmax is None  # stateful samplers keep llama.cpp's chain
    with Sampler(model, SamplerConfig(grammar='root ::= "a"')) as constrained:
        assert constrained._argmax is None


def test_sample_rows_picks_what_sampling_one_row_at_a_time_picks(model: Model) -> None:
    # One step of four sequences (prompts of different lengths, so the output rows are not at even batch
    # indices), sampled in bulk and one by one with identically built samplers, picks given out of row order.
    prompts = [model.tokenize(p) for p in (PROMPT, "Once upon a time", "1, 2, 3, 4,", "Hello")]
    cfg = ContextConfig(n_ctx=1024, n_batch=128, n_seq_max=4)

    def decoded(ctx: Context) -> list[int]:
        batch = Batch(128, 1)
        rows = [batch.add_sequence(p, 0, seq) for seq, p in enumerate(prompts)]
        ctx.decode(batch)
        return rows

    def configs(rows: list[int], ctx: Context) -> list[SamplerConfig]:
        top = int(np.argmax(ctx.logits(rows[2])))
        return [
            SamplerConfig(),
            SamplerConfig(logit_bias={top: -1e9}),  # row 2's raw maximum banned: the bias path
            SamplerConfig(logit_bias={7: 1e9}),  # promoted past everything
            SamplerConfig(logit_bias={top: 0.5}),
        ]

    def run(bulk: bool, mix: bool) -> list[int]:
        with Context(model, cfg) as ctx:
            rows = decoded(ctx)
            cfgs = configs(rows, ctx)
            if mix:  # one sequence samples from a seeded distribution: the others cannot use the whole matrix
                cfgs[3] = SamplerConfig(temperature=0.9, seed=3)
            samplers = [Sampler(model, c) for c in cfgs]
            try:
                picks = [(samplers[i], rows[i]) for i in (3, 1, 0, 2)]
                if bulk:
                    return sample_rows(ctx, picks)
                return [s.sample(ctx, r) for s, r in picks]
            finally:
                for s in samplers:
                    s.close()

    for mix in (False, True):
        one_by_one = run(bulk=False, mix=mix)
        assert run(bulk=True, mix=mix) == one_by_one
        assert one_by_one[3] == 7  # the promoted token, from sequence 2 (listed last)
    with Context(model, cfg) as ctx, Sampler(model) as s:
        rows = decoded(ctx)
        with pytest.raises(InvalidInputError):
            sample_rows(ctx, [(s, rows[0] - 1)])  # a row without logits
        picked = sample_rows(ctx, [(s, rows[0]), (s, rows[0])])  # the same row twice
        assert picked == [int(np.argmax(ctx.logits(rows[0])))] * 2


def test_seeded_sampling_is_reproducible_and_seed_dependent(model: Model) -> None:
    def run(seed: int) -> list[int]:
        cfg = SamplerConfig(temperature=1.5, top_k=200, top_p=0.98, min_p=0.001, seed=seed)
        with Context(model, CFG) as ctx, Sampler(model, cfg) as sampler:
            tokens, _ = cold_run(ctx, sampler, model.tokenize(PROMPT), 24)
        return tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampler_chain_is_built_from_the_config(model: Model) -> None:
    with Sampler(model) as greedy:
        assert greedy.length == 1
    cfg = SamplerConfig(
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        typical_p=0.95,
        repeat_penalty=1.1,
        frequency_penalty=0.1,
        presence_penalty=0.1,
        seed=1,
        logit_bias={5: -1.0},
    )
    with Sampler(model, cfg) as full:
        # logit bias, penalties, top-k, typical, top-p, min-p, temperature, dist
        assert full.length == 8


def test_logit_bias_can_ban_the_greedy_choice(model: Model) -> None:
    first = _greedy(model, 1)[0]
    with Context(model, CFG) as ctx, Sampler(model, SamplerConfig(logit_bias={first: -1e9})) as sampler:
        tokens, _ = cold_run(ctx, sampler, model.tokenize(PROMPT), 1)
    assert tokens[0] != first


def test_repeat_penalty_changes_a_repetitive_continuation(model: Model) -> None:
    plain = _greedy(model, 32)
    with Context(model, CFG) as ctx, Sampler(model, SamplerConfig(repeat_penalty=1.8, penalty_last_n=64)) as s:
        penalised, _ = cold_run(ctx, s, model.tokenize(PROMPT), 32)
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))


def test_grammar_constrains_the_output(model: Model) -> None:
    grammar = 'root ::= ("yes" | "no") "."'
    with Context(model, CFG) as ctx, Sampler(model, SamplerConfig(grammar=grammar)) as sampler:
        row = ctx.decode_tokens(model.tokenize(PROMPT))
        out = []
        for _ in range(8):
            token = sampler.sample(ctx, row)
            if model.is_eog(token):
                break
            out.append(token)
            row = step(ctx, token)
    assert model.detokenize(out).strip() in ("yes.", "no.")


def test_bad_grammar_is_a_sampler_error(model: Model) -> None:
    with pytest.raises(SamplerError, match="grammar"):
        Sampler(model, SamplerConfig(grammar="root ::= ( unclosed"))


def test_batch_with_several_sequences_matches_separate_decodes(model: Model) -> None:
    a, b = model.tokenize("the cache is warm"), model.tokenize("hello world, the dog")
    cfg = ContextConfig(n_ctx=1024, n_batch=128, n_seq_max=2)
    with Context(model, cfg) as ctx:
        batch = Batch(128)
        batch.add_sequence(a, 0, 0)
        row_b = batch.add_sequence(b, 0, 1)
        row_a = len(a) - 1
        ctx.decode(batch)
        mixed_a, mixed_b = ctx.logits(row_a), ctx.logits(row_b)
    with Context(model, cfg) as ctx:
        solo_a = ctx.logits(ctx.decode_tokens(a, 0))
        solo_b = ctx.logits(ctx.decode_tokens(b, 1))
    assert int(np.argmax(mixed_a)) == int(np.argmax(solo_a))
    assert int(np.argmax(mixed_b)) == int(np.argmax(solo_b))
    np.testing.assert_allclose(mixed_a, solo_a, atol=1e-3 * float(np.abs(solo_a).max()))


def test_embeddings_mode(model: Model) -> None:
    cfg = ContextConfig(n_ctx=256, n_batch=64, embeddings=True)
    with Context(model, cfg) as ctx:
        row = ctx.decode_tokens(model.tokenize("embed me"))
        emb = ctx.embeddings(row)
    assert emb.shape == (model.info.n_embd,)
    assert np.isfinite(emb).all()
    assert float(np.abs(emb).sum()) > 0
