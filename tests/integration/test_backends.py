"""One conformance suite for every ModelBackend: the stub and llama.cpp (tiny model and SmolLM2).

What the worker and the cache rely on: per-sequence decoding in shared batches, deterministic greedy and seeded
sampling, and state blobs that restore into any sequence and continue exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from erllama._native import ContextConfig
from erllama.errors import ContextOverflowError, DecodeAbortedError, InvalidInputError, SeqIdError, StateError
from erllama.model import DecodeItem, LlamaBackend, ModelBackend, SamplerConfig, StubBackend

PROMPT = "The cache keeps the prompt warm, so the model never computes it twice. Hello world, 世界 🎉"


@pytest.fixture(params=["stub", "tiny", pytest.param("smollm2", marks=pytest.mark.smollm2)])
def backend(request: pytest.FixtureRequest) -> Iterator[ModelBackend]:
    if request.param == "stub":
        b: ModelBackend = StubBackend(n_seq_max=4, n_ctx_seq=1024, n_batch=256)
    else:
        request.getfixturevalue("native")
        path: Path = request.getfixturevalue(f"{request.param}_path")
        b = LlamaBackend(path, context_config=ContextConfig(n_ctx=4096, n_batch=256, n_seq_max=4))
    yield b
    b.close()


def generate(b: ModelBackend, seq: int, prompt: list[int], n: int) -> list[int]:
    """Cold path: prompt[:-1] first, then the last prompt token alone, then n sampled tokens."""
    if len(prompt) > 1:
        b.decode([DecodeItem(seq, prompt[:-1], logits=False)])
    return continue_from(b, seq, prompt[-1], n)


def continue_from(b: ModelBackend, seq: int, pending: int, n: int) -> list[int]:
    out = []
    (row,) = b.decode([DecodeItem(seq, [pending])])
    for _ in range(n):
        assert row is not None
        token = b.sample(seq, row)
        out.append(token)
        (row,) = b.decode([DecodeItem(seq, [token])])
    return out


def test_info_and_tokens(backend: ModelBackend) -> None:
    info = backend.info
    assert info.n_seq_max == 4
    assert info.n_vocab > 200
    assert info.fingerprint
    tokens = backend.tokenize(PROMPT)
    assert all(0 <= t < info.n_vocab for t in tokens)
    text = b"".join(backend.token_to_piece(t) for t in tokens).decode("utf-8")
    assert text.strip() == PROMPT


def test_greedy_is_deterministic_and_state_restores_into_another_sequence(backend: ModelBackend) -> None:
    prompt = backend.tokenize(PROMPT)
    ref = generate(backend, 0, prompt, 12)
    assert ref == generate(backend, 1, prompt, 12)
    backend.seq_truncate(2, 0)
    backend.decode([DecodeItem(2, prompt[:-1], logits=False)])
    blob = bytes(backend.state_get(2))
    backend.state_set(3, blob)
    assert backend.seq_len(3) == len(prompt) - 1
    assert continue_from(backend, 3, prompt[-1], 12) == ref


def test_one_batch_of_several_sequences_matches_separate_runs(backend: ModelBackend) -> None:
    a, b = backend.tokenize("the quick brown fox"), backend.tokenize("hello world")
    solo_a = generate(backend, 0, a, 6)
    solo_b = generate(backend, 1, b, 6)
    rows = backend.decode([DecodeItem(2, a[:-1], logits=False), DecodeItem(3, b[:-1], logits=False)])
    assert rows == [None, None]
    outs: dict[int, list[int]] = {2: [], 3: []}
    pending = {2: a[-1], 3: b[-1]}
    for step in range(7):
        order = (2, 3) if step % 2 else (3, 2)  # rows come back in the items' order, whatever order runs
        rows = backend.decode([DecodeItem(s, [pending[s]]) for s in order])
        for s, row in zip(order, rows, strict=True):
            assert row is not None
            pending[s] = backend.sample(s, row)
            outs[s].append(pending[s])
    assert outs[2][:6] == solo_a
    assert outs[3][:6] == solo_b


def test_seeded_sampling_is_reproducible(backend: ModelBackend) -> None:
    prompt = backend.tokenize(PROMPT)
    cfg = SamplerConfig(temperature=1.2, top_k=50, top_p=0.95, seed=11)
    backend.set_sampler(0, cfg)
    backend.set_sampler(1, cfg)
    assert generate(backend, 0, prompt, 10) == generate(backend, 1, prompt, 10)


def test_bad_input_is_refused(backend: ModelBackend) -> None:
    with pytest.raises(SeqIdError):
        backend.decode([DecodeItem(backend.info.n_seq_max, [1])])
    with pytest.raises(InvalidInputError):
        backend.decode([DecodeItem(0, [5]), DecodeItem(0, [6])])
    with pytest.raises(InvalidInputError):
        backend.decode([DecodeItem(0, [5] * (backend.info.n_batch + 1))])
    with pytest.raises(InvalidInputError):
        backend.decode([DecodeItem(0, [backend.info.n_vocab])])
    with pytest.raises(StateError):
        backend.state_set(0, b"definitely not a state blob")
    assert backend.seq_len(0) == 0
    big = [5] * (backend.info.n_batch - 1)
    while backend.seq_len(1) + len(big) <= backend.info.n_ctx_seq:
        backend.decode([DecodeItem(1, big, logits=False)])
    with pytest.raises(ContextOverflowError):
        backend.decode([DecodeItem(1, big, logits=False)])
    backend.seq_truncate(1, 0)
    backend.abort()
    with pytest.raises(DecodeAbortedError):
        backend.decode([DecodeItem(0, backend.tokenize("hi"))])
    backend.clear_abort()
    backend.seq_truncate(0, 0)
    assert generate(backend, 0, backend.tokenize("still fine"), 2)
