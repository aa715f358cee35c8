"""``Context``: one llama context (KV cache + compute graph), confined to the thread that created it.

cffi releases the GIL during every C call, so nothing but discipline stops a second thread from freeing a context
in the middle of ``llama_decode``. Each Context therefore records its owner thread and every method checks it;
other threads may only call :meth:`Context.request_abort` / :meth:`Context.clear_abort`, which write one byte.

Every C call is preceded by the checks that keep llama.cpp's assertions (which abort the whole process) out of
reach: token ids in the vocabulary, sequence ids below n_seq_max, batches no larger than n_batch, positions that
continue the sequence and fit its room in the KV cache, and output rows that the last decode produced.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from erllama._native import errcheck
from erllama._native.batch import Batch
from erllama._native.loader import ffi, lib, library
from erllama._native.model import LoraAdapter, Model
from erllama._native.params import ContextConfig, FlashAttention
from erllama._native.shim import x87_resetter
from erllama.errors import (
    AdapterError,
    ClosedError,
    ContextCreateError,
    ContextOverflowError,
    DecodeAbortedError,
    DecodeError,
    InvalidInputError,
    KVCacheFullError,
    SeqIdError,
    StateError,
    ThreadAffinityError,
)

__all__ = ["Context"]

_alloc = ffi.new_allocator(should_clear_after_alloc=False)


class Context:
    """A llama context over a Model. Create, use and close it on one thread."""

    def __init__(self, model: Model, config: ContextConfig | None = None) -> None:
        self._handle: Any = None
        self._owner = threading.get_ident()
        self.config = cfg = config or ContextConfig()
        self.model = model
        if cfg.n_seq_max > int(lib().llama_max_parallel_sequences()):
            raise InvalidInputError(f"n_seq_max {cfg.n_seq_max} exceeds llama.cpp's limit")
        params = lib().llama_context_default_params()
        params.n_ctx = cfg.n_ctx
        params.n_batch = cfg.n_batch
        params.n_ubatch = min(cfg.n_ubatch, cfg.n_batch)
        params.n_seq_max = cfg.n_seq_max
        threads = cfg.n_threads or os.cpu_count() or 1
        params.n_threads = threads
        params.n_threads_batch = cfg.n_threads_batch or threads
        flash = cfg.flash_attn or (FlashAttention.OFF if library().backend == "cpu" else FlashAttention.AUTO)
        params.flash_attn_type = flash.value
        params.type_k = cfg.type_k.value
        params.type_v = cfg.type_v.value
        params.embeddings = cfg.embeddings
        params.kv_unified = cfg.kv_unified
        params.swa_full = cfg.swa_full
        params.offload_kqv = cfg.offload_kqv
        params.no_perf = False
        # Abort flag: two bytes, the second always NUL. strlen() of it is exactly 1 when an abort is requested and
        # 0 otherwise, so libc's strlen, cast to ggml_abort_callback, *is* the check: ggml polls it after every
        # graph node on its compute thread without taking the GIL (a Python callback there would cost a GIL round
        # trip per node, on the critical path of every decode).
        self._abort_flag = ffi.new("char[2]")
        params.abort_callback = ffi.cast("ggml_abort_callback", _strlen_pointer())
        params.abort_callback_data = self._abort_flag
        # ggml's compute threads inherit the x87 state of the thread that starts them: start them clean, and keep
        # the owner thread (which computes too) clean before every decode (docs/runtime.md, "x87 state")
        self._x87_reset = x87_resetter()
        self._x87_reset()
        model._acquire()
        errcheck.clear_last_error()
        handle = lib().llama_init_from_model(model.handle, params)
        if handle == ffi.NULL:
            model._release()
            raise ContextCreateError(f"could not create a context: {errcheck.last_error('unknown error')}")
        self._handle = handle
        self._mem_handle = lib().llama_get_memory(handle)
        self.n_ctx = int(lib().llama_n_ctx(handle))
        self.n_ctx_seq = int(lib().llama_n_ctx_seq(handle))
        self.n_batch = int(lib().llama_n_batch(handle))
        self.n_ubatch = int(lib().llama_n_ubatch(handle))
        self.n_seq_max = int(lib().llama_n_seq_max(handle))
        self.n_vocab = model.n_vocab
        self._outputs: npt.NDArray[np.int8] = np.zeros(0, dtype=np.int8)
        self._adapters: list[tuple[LoraAdapter, float]] = []
        self._scratch = Batch(self.n_batch, 1)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            # Freeing here could run on any thread, racing a decode on the owner: leak and say so instead.
            warnings.warn("Context was never closed; its KV cache is leaked", ResourceWarning, stacklevel=1)

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def _memory(self) -> Any:
        """The context's ``llama_memory_t``, only while the context is open and on the owner thread."""
        self.handle  # noqa: B018
        return self._mem_handle

    @property
    def handle(self) -> Any:
        """The raw ``llama_context *`` (checks it is open and that this is the owner thread)."""
        if self._handle is None:
            raise ClosedError("context is closed")
        if threading.get_ident() != self._owner:
            raise ThreadAffinityError("a llama context may only be used by the thread that created it")
        return self._handle

    def close(self) -> None:
        """Free the KV cache and compute buffers. Owner thread only; idempotent."""
        if self._handle is None:
            return
        handle = self.handle
        self._handle = None
        lib().llama_free(handle)
        self._track_adapters([])
        self.model._release()

    # -- cancellation (any thread) ---------------------------------------------------------------------------

    def request_abort(self) -> None:
        """Ask a running (or the next) decode to stop after the current graph node. Safe from any thread."""
        self._abort_flag[0] = b"\x01"

    def clear_abort(self) -> None:
        """Allow decoding again after an abort. Safe from any thread."""
        self._abort_flag[0] = b"\x00"

    @property
    def abort_requested(self) -> bool:
        return bool(self._abort_flag[0] != b"\x00")

    # -- settings --------------------------------------------------------------------------------------------

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        if n_threads < 1 or (n_threads_batch is not None and n_threads_batch < 1):
            raise InvalidInputError("thread counts must be >= 1")
        lib().llama_set_n_threads(self.handle, n_threads, n_threads_batch or n_threads)

    @property
    def n_threads(self) -> int:
        return int(lib().llama_n_threads(self.handle))

    @property
    def n_threads_batch(self) -> int:
        return int(lib().llama_n_threads_batch(self.handle))

    def set_embeddings(self, enabled: bool) -> None:
        lib().llama_set_embeddings(self.handle, enabled)

    # -- decoding --------------------------------------------------------------------------------------------

    def check_seq(self, seq_id: int) -> int:
        if not 0 <= seq_id < self.n_seq_max:
            raise SeqIdError(seq_id, self.n_seq_max)
        return seq_id

    def _validate(self, batch: Batch) -> None:
        n = batch.n_tokens
        if n == 0:
            raise InvalidInputError("empty batch")
        if n > self.n_batch:
            raise InvalidInputError(f"batch of {n} tokens exceeds n_batch {self.n_batch}")
        if n == 1 and batch.n_seq_id[0] == 1:  # the decode-one-token hot path
            token, seq, pos = int(batch.token[0]), int(batch.seq_id[0, 0]), int(batch.pos[0])
            self.model._check_token(token)
            self.check_seq(seq)
            self._check_positions(seq, pos, pos)
            return
        self.model.check_tokens(batch.token[:n])
        n_ids = batch.n_seq_id[:n]
        if n <= 64 and n_ids.min() == n_ids.max() == 1:
            seqs = batch.seq_id[:n, 0].tolist()
            if len(set(seqs)) == n:  # one token per sequence, the shape of every generation step: plain loops
                for seq, pos in zip(seqs, batch.pos[:n].tolist(), strict=True):
                    self.check_seq(seq)
                    self._check_positions(seq, pos, pos)
                return
        if int(n_ids.min()) < 1 or int(n_ids.max()) > batch.n_seq_max:
            raise InvalidInputError("every token must belong to at least one sequence")
        positions = batch.pos[:n]
        for k in range(int(n_ids.max())):
            rows = n_ids > k
            seqs = batch.seq_id[:n, k][rows]
            lo, hi = int(seqs.min()), int(seqs.max())
            if lo < 0 or hi >= self.n_seq_max:
                raise SeqIdError(lo if lo < 0 else hi, self.n_seq_max)
            for seq in np.unique(seqs):
                p = positions[rows][seqs == seq]
                self._check_positions(int(seq), int(p.min()), int(p.max()))

    def _check_positions(self, seq: int, first: int, last: int) -> None:
        nxt = int(lib().llama_memory_seq_pos_max(self._memory, seq)) + 1
        if first != nxt:
            raise InvalidInputError(f"sequence {seq} continues at position {nxt}, the batch starts at {first}")
        if last >= self.n_ctx_seq:
            raise ContextOverflowError(seq, last + 1, self.n_ctx_seq)

    def decode(self, batch: Batch) -> None:
        """Run one batch through the model. Logits of rows marked ``logits`` are then readable.

        llama_decode's return codes (llama.h): 0 success; 1 no KV slot for the batch; 2 aborted (processed
        ubatches stay in memory); -1 invalid batch; < -1 fatal (processed ubatches stay in memory).
        """
        handle = self.handle
        self._validate(batch)
        errcheck.clear_last_error()
        self._x87_reset()
        rc = lib().llama_decode(handle, batch.as_struct())
        if rc == 0:
            self._outputs = batch.logits[: batch.n_tokens].copy()
            return
        self._outputs = np.zeros(0, dtype=np.int8)
        if rc == 1:
            raise KVCacheFullError("no KV cache slot for the batch; free sequences or use a larger n_ctx", rc)
        if rc == 2:
            raise DecodeAbortedError("decode aborted on request; finished micro-batches remain in the KV cache", rc)
        raise DecodeError(f"llama_decode failed with code {rc}: {errcheck.last_error('no detail logged')}", rc)

    def decode_tokens(
        self,
        tokens: Sequence[int] | npt.NDArray[np.int32],
        seq_id: int = 0,
        *,
        logits_last: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Append tokens to a sequence, in chunks of at most n_batch; returns the logits row of the last chunk.

        ``should_stop`` is polled between chunks; when it returns True the remaining chunks are skipped and
        DecodeAbortedError is raised (the chunks already decoded stay in the sequence).
        """
        self.handle  # noqa: B018 - open, owner thread
        self.check_seq(seq_id)
        arr = np.asarray(tokens, dtype=np.int32)
        if arr.ndim != 1 or len(arr) == 0:
            raise InvalidInputError("decode_tokens needs a non-empty 1-D token list")
        self.model.check_tokens(arr)
        start = int(lib().llama_memory_seq_pos_max(self._memory, seq_id)) + 1
        if start + len(arr) > self.n_ctx_seq:
            raise ContextOverflowError(seq_id, start + len(arr), self.n_ctx_seq)
        batch = self._scratch
        row = 0
        for off in range(0, len(arr), self.n_batch):
            if should_stop is not None and should_stop():
                raise DecodeAbortedError("prefill stopped between chunks on request", 2)
            chunk = arr[off : off + self.n_batch]
            batch.clear()
            last = off + len(chunk) == len(arr)
            row = batch.add_sequence(chunk, start + off, seq_id, logits_last=logits_last and last)
            self.decode(batch)
        return row

    def _check_output(self, i: int) -> None:
        if not 0 <= i < len(self._outputs) or not self._outputs[i]:
            raise InvalidInputError(f"row {i} of the last batch has no outputs (mark it with logits=True)")

    def logits(self, i: int) -> npt.NDArray[np.float32]:
        """A copy of the logits of output row ``i`` of the last decode."""
        return self._logits_view(i).copy()

    def _logits_view(self, i: int) -> npt.NDArray[np.float32]:
        """Output row ``i`` of the last decode, read-only and in place: valid until the next decode."""
        self._check_output(i)
        ptr = lib().llama_get_logits_ith(self.handle, i)
        if ptr == ffi.NULL:
            raise DecodeError(f"no logits for row {i}: {errcheck.last_error('')}", -1)
        view = np.frombuffer(ffi.buffer(ptr, self.n_vocab * 4), dtype=np.float32)
        view.flags.writeable = False
        return view

    def _logits_matrix(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.intp]]:
        """Every output row of the last decode as one read-only matrix, in place (valid until the next decode), and
        for each batch row its row in the matrix (-1: no output). One call for a whole step's rows: llama.cpp keeps
        the outputs in batch order, so batch row ``i`` is the matrix's row "number of outputs before ``i``"."""
        outputs = self._outputs
        n_out = int(np.count_nonzero(outputs))
        if n_out == 0:
            raise InvalidInputError("the last batch has no outputs (mark rows with logits=True)")
        ptr = lib().llama_get_logits(self.handle)
        if ptr == ffi.NULL:
            raise DecodeError(f"no logits: {errcheck.last_error('')}", -1)
        matrix = np.frombuffer(ffi.buffer(ptr, n_out * self.n_vocab * 4), dtype=np.float32).reshape(n_out, -1)
        matrix.flags.writeable = False
        where = np.cumsum(outputs != 0, dtype=np.intp) - 1
        where[outputs == 0] = -1
        return matrix, where

    def embeddings(self, i: int) -> npt.NDArray[np.float32]:
        """A copy of the embeddings of output row ``i`` (needs ``embeddings=True``)."""
        self._check_output(i)
        ptr = lib().llama_get_embeddings_ith(self.handle, i)
        if ptr == ffi.NULL:
            raise DecodeError("no embeddings for this row; create the context with embeddings=True", -1)
        n = self.model.info.n_embd
        return np.frombuffer(ffi.buffer(ptr, n * 4), dtype=np.float32).copy()

    def embeddings_seq(self, seq_id: int) -> npt.NDArray[np.float32]:
        """A copy of the pooled embedding of a sequence (pooling contexts only)."""
        self.check_seq(seq_id)
        ptr = lib().llama_get_embeddings_seq(self.handle, seq_id)
        if ptr == ffi.NULL:
            raise DecodeError("no pooled embedding for this sequence", -1)
        n = self.model.info.n_embd
        return np.frombuffer(ffi.buffer(ptr, n * 4), dtype=np.float32).copy()

    # -- memory (KV cache) per sequence ----------------------------------------------------------------------

    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position held for the sequence, -1 when empty."""
        return int(lib().llama_memory_seq_pos_min(self._memory, self.check_seq(seq_id)))

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position held for the sequence, -1 when empty."""
        return int(lib().llama_memory_seq_pos_max(self._memory, self.check_seq(seq_id)))

    def seq_len(self, seq_id: int) -> int:
        return self.seq_pos_max(seq_id) + 1

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence (negative bounds are open). False if it cannot be partial."""
        if seq_id != -1:
            self.check_seq(seq_id)
        return bool(lib().llama_memory_seq_rm(self._memory, seq_id, p0, p1))

    def seq_keep_first(self, seq_id: int, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` positions of a sequence."""
        if n_tokens < 0:
            raise InvalidInputError("n_tokens must be >= 0")
        if not self.seq_rm(seq_id, n_tokens, -1):
            raise StateError(f"sequence {seq_id} cannot be truncated to {n_tokens} tokens (recurrent/SWA memory)")

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Copy the cells of ``src`` in [p0, p1) to ``dst`` (shared cells in a unified KV cache).

        Without kv_unified each sequence has its own stream and llama.cpp can only copy a whole one (it asserts
        otherwise), so a partial range is refused here.
        """
        self.handle  # noqa: B018
        self.check_seq(src)
        self.check_seq(dst)
        if not self.config.kv_unified and src != dst and (p0 > 0 or p1 > 0):
            raise InvalidInputError("a partial seq_cp across KV streams needs a context with kv_unified=True")
        lib().llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        """Remove every sequence but this one."""
        lib().llama_memory_seq_keep(self._memory, self.check_seq(seq_id))

    def clear(self, data: bool = True) -> None:
        """Empty the whole KV cache (and zero its buffers when ``data``)."""
        lib().llama_memory_clear(self._memory, data)
        self._outputs = np.zeros(0, dtype=np.int8)

    @property
    def can_shift(self) -> bool:
        return bool(lib().llama_memory_can_shift(self._memory))

    # -- per-sequence state ----------------------------------------------------------------------------------

    def state_seq_size(self, seq_id: int) -> int:
        """Bytes needed to save one sequence's state."""
        return int(lib().llama_state_seq_get_size(self.handle, self.check_seq(seq_id)))

    def state_seq_get(self, seq_id: int) -> memoryview:
        """The sequence's KV state, copied once from llama.cpp into a fresh, non-zeroed buffer."""
        handle = self.handle
        self.check_seq(seq_id)
        size = int(lib().llama_state_seq_get_size(handle, seq_id))
        if size == 0:
            raise StateError(f"could not size the state of sequence {seq_id}: {errcheck.last_error('')}")
        buf = np.empty(size, dtype=np.uint8)
        errcheck.clear_last_error()
        n = int(lib().llama_state_seq_get_data(handle, ffi.from_buffer("uint8_t[]", buf), size, seq_id))
        if n == 0:
            raise StateError(f"could not save the state of sequence {seq_id}: {errcheck.last_error('')}")
        return buf.data[:n]

    def state_seq_set(self, data: bytes | bytearray | memoryview | npt.NDArray[np.uint8], seq_id: int) -> int:
        """Restore a state saved by :meth:`state_seq_get` into ``seq_id`` (replacing what it held).

        Returns the bytes consumed. A blob from another model or context layout raises StateError and leaves the
        sequence empty; the context stays usable.
        """
        handle = self.handle
        self.check_seq(seq_id)
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data
        size = len(view) if not isinstance(view, np.ndarray) else view.nbytes
        if size < 8:
            raise StateError(f"a sequence state of {size} bytes is too short to be one")
        errcheck.clear_last_error()
        n = int(lib().llama_state_seq_set_data(handle, ffi.from_buffer("uint8_t[]", view), size, seq_id))
        self._outputs = np.zeros(0, dtype=np.int8)
        if n == 0:
            lib().llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            raise StateError(f"could not restore the state into sequence {seq_id}: {errcheck.last_error('')}")
        return n

    # -- adapters --------------------------------------------------------------------------------------------

    def set_adapters(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
        """Attach exactly these LoRA adapters with these scales (an empty list detaches all)."""
        handle = self.handle
        for adapter, _ in adapters:
            if adapter.model is not self.model:
                raise AdapterError("an adapter can only be attached to contexts of its own model")
        ptrs = ffi.new("struct llama_adapter_lora *[]", [a.handle for a, _ in adapters] or [ffi.NULL])
        scales = ffi.new("float[]", [float(s) for _, s in adapters] or [0.0])
        rc = lib().llama_set_adapters_lora(handle, ptrs, len(adapters), scales)
        if rc != 0:
            raise AdapterError(f"could not attach LoRA adapters (code {rc}): {errcheck.last_error('')}")
        self._track_adapters(list(adapters))

    def _track_adapters(self, adapters: list[tuple[LoraAdapter, float]]) -> None:
        # An attached adapter refuses close(), so it cannot be freed under a context that applies it.
        for adapter, _ in adapters:
            adapter._attached += 1
        for adapter, _ in self._adapters:
            adapter._attached -= 1
        self._adapters = adapters

    @property
    def adapters(self) -> list[tuple[LoraAdapter, float]]:
        return list(self._adapters)

    # -- diagnostics -----------------------------------------------------------------------------------------

    def perf(self) -> dict[str, float]:
        """llama.cpp's own timings for this context."""
        d = lib().llama_perf_context(self.handle)
        return {
            "t_load_ms": d.t_load_ms,
            "t_prompt_ms": d.t_p_eval_ms,
            "t_eval_ms": d.t_eval_ms,
            "n_prompt_tokens": d.n_p_eval,
            "n_eval": d.n_eval,
        }

    def perf_reset(self) -> None:
        lib().llama_perf_context_reset(self.handle)


@functools.cache
def _strlen_pointer() -> Any:
    """libc's strlen as a C function pointer (the libc handle is cached with it and stays open)."""
    libc = ffi.dlopen(None)
    _libc_handles.append(libc)
    return ffi.addressof(libc, "strlen")


_libc_handles: list[Any] = []
