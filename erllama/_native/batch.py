"""``Batch``: the tokens of one ``llama_decode`` call, filled through numpy views of C arrays.

The batch owns its arrays (cffi allocations, freed with the Batch) instead of calling ``llama_batch_init``: the
per-token ``seq_id`` pointers are aimed once, at construction, into one contiguous block, so filling a prefill of
thousands of tokens is a handful of vectorised numpy writes instead of a Python loop over C pointers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from erllama._native.loader import ffi
from erllama.errors import InvalidInputError

__all__ = ["Batch"]

_alloc = ffi.new_allocator(should_clear_after_alloc=False)


class Batch:
    """Room for up to ``capacity`` tokens, each in up to ``n_seq_max`` sequences."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        if capacity < 1 or n_seq_max < 1:
            raise InvalidInputError("a batch needs capacity >= 1 and n_seq_max >= 1")
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self._token = _alloc("llama_token[]", capacity)
        self._pos = _alloc("llama_pos[]", capacity)
        self._n_seq_id = _alloc("int32_t[]", capacity)
        self._seq_storage = _alloc("llama_seq_id[]", capacity * n_seq_max)
        self._seq_ptrs = _alloc("llama_seq_id *[]", capacity)
        self._logits = _alloc("int8_t[]", capacity)
        # seq_id[i] = &storage[i * n_seq_max], written as addresses in one vectorised store
        ptrs = _view(self._seq_ptrs, capacity * ffi.sizeof("void *"), np.uintp)
        base = int(ffi.cast("uintptr_t", self._seq_storage))
        ptrs[:] = base + np.arange(capacity, dtype=np.uintp) * (n_seq_max * ffi.sizeof("llama_seq_id"))
        self.token: npt.NDArray[np.int32] = _view(self._token, capacity * 4, np.int32)
        self.pos: npt.NDArray[np.int32] = _view(self._pos, capacity * 4, np.int32)
        self.n_seq_id: npt.NDArray[np.int32] = _view(self._n_seq_id, capacity * 4, np.int32)
        self.seq_id: npt.NDArray[np.int32] = _view(self._seq_storage, capacity * n_seq_max * 4, np.int32).reshape(
            capacity, n_seq_max
        )
        self.logits: npt.NDArray[np.int8] = _view(self._logits, capacity, np.int8)
        self._struct = ffi.new("llama_batch *")
        self._struct.token = self._token
        self._struct.embd = ffi.NULL
        self._struct.pos = self._pos
        self._struct.n_seq_id = self._n_seq_id
        self._struct.seq_id = self._seq_ptrs
        self._struct.logits = self._logits
        self.n_tokens = 0

    def __len__(self) -> int:
        return self.n_tokens

    def clear(self) -> None:
        self.n_tokens = 0

    def add(self, token: int, pos: int, seq_ids: Sequence[int] | int, logits: bool = False) -> int:
        """Append one token; returns its row (the index to read its logits with)."""
        i = self.n_tokens
        if i >= self.capacity:
            raise InvalidInputError(f"batch is full ({self.capacity} tokens)")
        ids = (seq_ids,) if isinstance(seq_ids, int) else tuple(seq_ids)
        if not 1 <= len(ids) <= self.n_seq_max:
            raise InvalidInputError(f"a token belongs to 1..{self.n_seq_max} sequences, got {len(ids)}")
        self.token[i] = token
        self.pos[i] = pos
        self.n_seq_id[i] = len(ids)
        self.seq_id[i, : len(ids)] = ids
        self.logits[i] = logits
        self.n_tokens = i + 1
        return i

    def add_sequence(
        self, tokens: Sequence[int] | npt.NDArray[np.int32], pos0: int, seq_id: int, logits_last: bool = True
    ) -> int:
        """Append consecutive tokens of one sequence at positions pos0, pos0+1, ...; returns the last row."""
        n = len(tokens)
        i = self.n_tokens
        if n == 0:
            raise InvalidInputError("no tokens to add")
        if i + n > self.capacity:
            raise InvalidInputError(f"{n} tokens do not fit the batch ({self.capacity - i} free)")
        self.token[i : i + n] = tokens
        self.pos[i : i + n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self.n_seq_id[i : i + n] = 1
        self.seq_id[i : i + n, 0] = seq_id
        self.logits[i : i + n] = 0
        if logits_last:
            self.logits[i + n - 1] = 1
        self.n_tokens = i + n
        return i + n - 1

    def as_struct(self) -> Any:
        """The ``llama_batch`` to pass by value, sized to the tokens added so far."""
        self._struct.n_tokens = self.n_tokens
        return self._struct[0]


def _view(cdata: Any, nbytes: int, dtype: type[np.generic]) -> Any:
    return np.frombuffer(ffi.buffer(cdata, nbytes), dtype=dtype)
