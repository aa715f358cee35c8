"""Bad input never reaches llama.cpp: a clear Python exception instead, and the context keeps working.

A llama.cpp assertion aborts the whole process, so each of these would kill pytest if a check were missing.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from erllama._native import Batch, Context, ContextConfig, Model, Sampler
from erllama.errors import (
    ClosedError,
    ContextOverflowError,
    DecodeAbortedError,
    InvalidInputError,
    ModelLoadError,
    ResourceBusyError,
    SeqIdError,
    StateError,
    ThreadAffinityError,
    TokenIdError,
)
from erllama.sampling import SamplerConfig
from tests.integration.helpers import step

pytestmark = pytest.mark.native

CFG = ContextConfig(n_ctx=256, n_batch=64, n_seq_max=2)


@pytest.fixture
def ctx(model: Model) -> Iterator[Context]:
    with Context(model, CFG) as c:
        yield c


def assert_still_works(ctx: Context, model: Model, seq_id: int = 0) -> None:
    ctx.seq_rm(seq_id)
    row = ctx.decode_tokens(model.tokenize("the cache is warm"), seq_id)
    with Sampler(model) as sampler:
        token = sampler.sample(ctx, row)
    assert 0 <= token < model.n_vocab
    ctx.seq_rm(seq_id)


def test_over_long_prompt(ctx: Context, model: Model) -> None:
    too_long = (model.tokenize("hello world ") * 400)[: ctx.n_ctx_seq + 1]
    with pytest.raises(ContextOverflowError) as info:
        ctx.decode_tokens(too_long)
    assert info.value.needed == ctx.n_ctx_seq + 1
    assert ctx.seq_len(0) == 0, "nothing was decoded"
    ctx.decode_tokens(too_long[: ctx.n_ctx_seq - 10])
    with pytest.raises(ContextOverflowError):
        ctx.decode_tokens(too_long[:11])
    assert_still_works(ctx, model)


def test_batch_larger_than_n_batch(ctx: Context, model: Model) -> None:
    batch = Batch(ctx.n_batch + 1)
    batch.add_sequence([model.info.bos] * (ctx.n_batch + 1), 0, 0)
    with pytest.raises(InvalidInputError, match="n_batch"):
        ctx.decode(batch)
    assert_still_works(ctx, model)


@pytest.mark.parametrize("bad", [-1, -(2**31), 10**9])
def test_bad_token_ids(ctx: Context, model: Model, bad: int) -> None:
    bad = model.n_vocab if bad == 10**9 else bad
    with pytest.raises(TokenIdError):
        ctx.decode_tokens([model.info.bos, bad])
    with pytest.raises(TokenIdError):
        step(ctx, bad)
    with pytest.raises(TokenIdError):
        model.token_to_piece(bad)
    with pytest.raises(TokenIdError):
        model.detokenize([bad])
    with pytest.raises(TokenIdError):
        model.is_eog(bad)
    with pytest.raises(TokenIdError):
        Sampler(model, SamplerConfig(logit_bias={bad: 1.0}))
    with Sampler(model) as sampler, pytest.raises(TokenIdError):
        sampler.accept(bad)
    assert_still_works(ctx, model)


@pytest.mark.parametrize("bad", [-1, 2, 64, 2**31 - 1])
def test_bad_seq_ids(ctx: Context, model: Model, bad: int) -> None:
    with pytest.raises(SeqIdError):
        ctx.decode_tokens(model.tokenize("hi"), bad)
    batch = Batch(4)
    batch.add(model.info.bos, 0, bad, logits=True)
    with pytest.raises(SeqIdError):
        ctx.decode(batch)
    for op in (ctx.seq_pos_max, ctx.seq_pos_min, ctx.state_seq_size, ctx.state_seq_get, ctx.seq_keep):
        with pytest.raises(SeqIdError):
            op(bad)
    with pytest.raises(SeqIdError):
        ctx.seq_cp(0, bad)
    if bad != -1:  # -1 means "every sequence" to seq_rm
        with pytest.raises(SeqIdError):
            ctx.seq_rm(bad)
    with pytest.raises(SeqIdError):
        ctx.state_seq_set(b"\0" * 64, bad)
    assert_still_works(ctx, model)


def test_positions_must_continue_the_sequence(ctx: Context, model: Model) -> None:
    ctx.decode_tokens(model.tokenize("hello"))
    batch = Batch(4)
    batch.add(model.info.bos, ctx.seq_len(0) + 5, 0, logits=True)
    with pytest.raises(InvalidInputError, match="continues at position"):
        ctx.decode(batch)
    assert_still_works(ctx, model)


def test_a_generation_step_batch_is_checked_too(ctx: Context, model: Model) -> None:
    # one token for each of several sequences: the shape of every generation step, validated on its own fast path
    ctx.decode_tokens(model.tokenize("hello"), 0)
    ctx.decode_tokens(model.tokenize("world"), 1)
    bos = model.info.bos
    batch = Batch(4)
    batch.add(bos, ctx.seq_len(0), 0, logits=True)
    batch.add(bos, ctx.seq_len(1) + 1, 1, logits=True)
    with pytest.raises(InvalidInputError, match="sequence 1 continues at position"):
        ctx.decode(batch)
    batch = Batch(4)
    batch.add(bos, ctx.seq_len(0), 0, logits=True)
    batch.add(bos, 0, 7, logits=True)
    with pytest.raises(SeqIdError):
        ctx.decode(batch)
    before = ctx.seq_len(0), ctx.seq_len(1)
    batch = Batch(4)
    batch.add(bos, before[0], 0, logits=True)
    batch.add(bos, before[1], 1, logits=True)
    ctx.decode(batch)  # and a good one goes through
    assert (ctx.seq_len(0), ctx.seq_len(1)) == (before[0] + 1, before[1] + 1)
    assert_still_works(ctx, model)


def test_logits_of_a_row_without_outputs(ctx: Context, model: Model) -> None:
    row = ctx.decode_tokens(model.tokenize("hello world"))
    with pytest.raises(InvalidInputError, match="no outputs"):
        ctx.logits(row - 1)
    with pytest.raises(InvalidInputError):
        ctx.logits(10_000)
    with Sampler(model) as sampler, pytest.raises(InvalidInputError):
        sampler.sample(ctx, row + 1)
    assert_still_works(ctx, model)


def test_partial_copy_across_streams_is_refused(ctx: Context, model: Model) -> None:
    ctx.decode_tokens(model.tokenize("hello world, the cache"), 0)
    with pytest.raises(InvalidInputError, match="kv_unified"):
        ctx.seq_cp(0, 1, 0, 3)
    assert_still_works(ctx, model, seq_id=1)


def test_missing_and_corrupt_model_files(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Model(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="directory"):
        Model(tmp_path)
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        Model(not_gguf)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="could not load"):
        Model(garbage)
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(model_path.stat().st_size // 2))
    with pytest.raises(ModelLoadError):
        Model(truncated)
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(ModelLoadError):
        Model(empty)


def test_corrupt_state_blobs(ctx: Context, model: Model) -> None:
    ctx.decode_tokens(model.tokenize("the quick brown fox jumps over the lazy dog"), 0)
    blob = bytes(ctx.state_seq_get(0))
    for bad in (b"", b"abc", blob[: len(blob) // 2], b"\xff" * len(blob), blob[:8] + b"\x7f" * 32):
        with pytest.raises(StateError):
            ctx.state_seq_set(bad, 1)
        assert ctx.seq_len(1) == 0
    assert ctx.state_seq_set(blob, 1) == len(blob)
    assert ctx.seq_len(1) == ctx.seq_len(0)
    assert_still_works(ctx, model, seq_id=1)


@pytest.mark.smollm2
def test_state_from_another_model_is_refused(native: None, tiny_path: Path, smollm2_path: Path) -> None:
    cfg = ContextConfig(n_ctx=256, n_batch=64)
    blobs = {}
    with Model(tiny_path) as tiny, Model(smollm2_path) as smol:
        for m in (tiny, smol):
            with Context(m, cfg) as c:
                c.decode_tokens(m.tokenize("hello world, the cache is warm"))
                blobs[m] = bytes(c.state_seq_get(0))
        for m, other in ((tiny, smol), (smol, tiny)):
            with Context(m, cfg) as c:
                with pytest.raises(StateError, match="could not restore"):
                    c.state_seq_set(blobs[other], 0)
                assert c.seq_len(0) == 0
                assert_still_works(c, m)


def test_abort_flag_stops_decode_and_can_be_cleared(ctx: Context, model: Model) -> None:
    tokens = model.tokenize("the quick brown fox jumps over the lazy dog " * 3)[: ctx.n_batch]
    ctx.request_abort()
    assert ctx.abort_requested
    with pytest.raises(DecodeAbortedError) as info:
        ctx.decode_tokens(tokens)
    assert info.value.code == 2
    ctx.clear_abort()
    ctx.seq_rm(0)
    assert_still_works(ctx, model)


def test_prefill_stops_between_chunks(ctx: Context, model: Model) -> None:
    tokens = (model.tokenize("hello world ") * 100)[: 3 * ctx.n_batch]
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(DecodeAbortedError, match="between chunks"):
        ctx.decode_tokens(tokens, should_stop=should_stop)
    assert ctx.seq_len(0) == 2 * ctx.n_batch, "the two chunks before the stop stay decoded"
    assert_still_works(ctx, model)


@pytest.mark.smollm2
def test_abort_from_another_thread_mid_decode(native: None, smollm2_path: Path) -> None:
    with Model(smollm2_path) as m, Context(m, ContextConfig(n_ctx=1024, n_batch=512)) as c:
        tokens = (m.tokenize("the quick brown fox jumps over the lazy dog ") * 60)[:512]
        timer = threading.Timer(0.02, c.request_abort)
        timer.start()
        with pytest.raises(DecodeAbortedError):
            c.decode_tokens(tokens)
        timer.join()
        c.clear_abort()
        assert_still_works(c, m)


def test_context_is_confined_to_its_thread(ctx: Context, model: Model) -> None:
    errors: list[BaseException] = []

    def intruder() -> None:
        try:
            ctx.decode_tokens(model.tokenize("hi"))
        except ThreadAffinityError as exc:
            errors.append(exc)
        try:
            ctx.close()
        except ThreadAffinityError as exc:
            errors.append(exc)
        ctx.request_abort()  # the one thing other threads may do
        ctx.clear_abort()

    t = threading.Thread(target=intruder)
    t.start()
    t.join()
    assert [type(e) for e in errors] == [ThreadAffinityError, ThreadAffinityError]
    assert_still_works(ctx, model)


def test_closed_objects_and_close_order(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "copy.gguf"
    shutil.copyfile(model_path, path)
    m = Model(path)
    c = Context(m, ContextConfig(n_ctx=128, n_batch=32))
    s = Sampler(m)
    with pytest.raises(ResourceBusyError):
        m.close()
    c.close()
    c.close()  # idempotent
    with pytest.raises(ClosedError):
        c.decode_tokens([1])
    with pytest.raises(ClosedError):
        c.state_seq_get(0)
    s.close()
    s.close()
    with pytest.raises(ClosedError):
        s.reset()
    m.close()
    m.close()
    with pytest.raises(ClosedError):
        m.tokenize("hello")
    with pytest.raises(ClosedError):
        Context(m)
