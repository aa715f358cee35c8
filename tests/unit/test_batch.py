"""Batch: numpy views over the C arrays that llama_decode reads."""

from __future__ import annotations

import pytest

from erllama._native import Batch
from erllama._native.loader import ffi
from erllama.errors import InvalidInputError


def test_seq_id_pointers_aim_into_the_contiguous_block() -> None:
    batch = Batch(300, n_seq_max=3)
    batch.add_sequence(list(range(200)), 10, 2)
    batch.add(7, 0, [0, 1], logits=True)
    struct = batch.as_struct()
    assert struct.n_tokens == 201
    for i in (0, 57, 199):
        assert struct.token[i] == i
        assert struct.pos[i] == 10 + i
        assert struct.n_seq_id[i] == 1
        assert struct.seq_id[i][0] == 2
        assert struct.logits[i] == (1 if i == 199 else 0)
    assert (struct.seq_id[200][0], struct.seq_id[200][1], struct.n_seq_id[200]) == (0, 1, 2)
    stride = int(ffi.cast("uintptr_t", struct.seq_id[1])) - int(ffi.cast("uintptr_t", struct.seq_id[0]))
    assert stride == 3 * ffi.sizeof("llama_seq_id")


def test_capacity_and_shape_errors() -> None:
    batch = Batch(2)
    with pytest.raises(InvalidInputError, match="do not fit"):
        batch.add_sequence([1, 2, 3], 0, 0)
    with pytest.raises(InvalidInputError, match="no tokens"):
        batch.add_sequence([], 0, 0)
    with pytest.raises(InvalidInputError, match=r"1\.\.1 sequences"):
        batch.add(1, 0, [0, 1])
    batch.add(1, 0, 0)
    batch.add(2, 1, 0)
    with pytest.raises(InvalidInputError, match="full"):
        batch.add(3, 2, 0)
    batch.clear()
    assert len(batch) == 0
    with pytest.raises(InvalidInputError):
        Batch(0)
