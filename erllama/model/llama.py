"""``LlamaBackend``: the model-worker interface over the native binding (Model + Context + per-sequence samplers).

Create, use and close it on the worker thread: the Context inside refuses any other thread.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from erllama._native import Batch, Context, ContextConfig, LoraAdapter, Model, ModelConfig, Sampler, sample_rows
from erllama.cache.key import FingerprintMode, fingerprint
from erllama.errors import InvalidInputError, StateError
from erllama.model.backend import BackendInfo, DecodeItem
from erllama.sampling import SamplerConfig

__all__ = ["LlamaBackend", "kv_layout_params"]


def kv_layout_params(config: ContextConfig, n_ctx: int) -> dict[str, object]:
    """The context parameters a saved state depends on (they feed the cache namespace)."""
    return {
        "n_ctx": n_ctx,
        "n_seq_max": config.n_seq_max,
        "kv_unified": config.kv_unified,
        "type_k": config.type_k.name,
        "type_v": config.type_v.name,
        "flash_attn": config.flash_attn.name if config.flash_attn is not None else "default",
        "swa_full": config.swa_full,
    }


class LlamaBackend:
    """A GGUF model and one context with ``n_seq_max`` sequences."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        model_config: ModelConfig | None = None,
        context_config: ContextConfig | None = None,
        *,
        fingerprint_mode: FingerprintMode = FingerprintMode.GGUF_CHUNKED,
        fingerprint_value: str | None = None,
    ) -> None:
        self._model = Model(path, model_config)
        try:
            self._ctx = Context(self._model, context_config)
        except BaseException:
            self._model.close()
            raise
        self._samplers: dict[int, Sampler] = {}
        self._batch = Batch(self._ctx.n_batch, 1)
        info = self._model.info
        self._info = BackendInfo(
            name=os.path.basename(info.path),
            n_vocab=info.n_vocab,
            n_ctx_seq=self._ctx.n_ctx_seq,
            n_seq_max=self._ctx.n_seq_max,
            n_batch=self._ctx.n_batch,
            bos=info.bos,
            add_bos=info.add_bos,
            eog_tokens=frozenset(info.eog_tokens),
            fingerprint=fingerprint(path, fingerprint_mode, fingerprint_value),
            quantization=info.quantization,
            ctx_params=kv_layout_params(self._ctx.config, self._ctx.n_ctx),
            chat_template=info.chat_template,
            bos_text=self._model.token_text(info.bos) if 0 <= info.bos < info.n_vocab else "",
            eos_text=self._model.token_text(info.eos) if 0 <= info.eos < info.n_vocab else "",
            max_token_bytes=self._model.max_piece_bytes(),
            gguf_path=str(info.path),
        )
        can_cut = not info.is_recurrent and (info.n_swa == 0 or self._ctx.config.swa_full)
        if can_cut and self._batch_invariant():
            self._info = dataclasses.replace(self._info, last_token_foldable=True)

    @property
    def info(self) -> BackendInfo:
        return self._info

    def _batch_invariant(self) -> bool:
        """Decode a short prompt three ways on sequence 0 (one chunk; a chunk then the last token alone; one token
        per step) and check the last logits agree bit for bit. Empties sequence 0 again."""
        toks = self._model.tokenize("Is this model batch-invariant? One chunk, or one token per step.")[:12]
        if len(toks) < 3:
            return False
        ctx = self._ctx
        try:
            (row,) = self.decode([DecodeItem(0, toks)])
            chunk = ctx.logits(row or 0)
            ctx.seq_keep_first(0, 0)
            self.decode([DecodeItem(0, toks[:-1], logits=False)])
            (row,) = self.decode([DecodeItem(0, toks[-1:])])
            split = ctx.logits(row or 0)
            ctx.seq_keep_first(0, 0)
            for token in toks[:-1]:
                self.decode([DecodeItem(0, [token], logits=False)])
            (row,) = self.decode([DecodeItem(0, toks[-1:])])
            steps = ctx.logits(row or 0)
        finally:
            ctx.seq_keep_first(0, 0)
        return bool(np.array_equal(chunk, split) and np.array_equal(chunk, steps))

    @property
    def model(self) -> Model:
        return self._model

    @property
    def context(self) -> Context:
        return self._ctx

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        return self._model.token_to_piece(token, special=special)

    def apply_chat_template(self, messages: Sequence[tuple[str, str]], *, add_assistant: bool = True) -> str:
        return self._model.apply_chat_template(messages, add_assistant=add_assistant)

    def decode(self, items: Sequence[DecodeItem]) -> list[int | None]:
        batch = self._batch
        batch.clear()
        rows: list[int | None] = [None] * len(items)
        # In ascending sequence order: with a KV stream per sequence, llama.cpp cuts a micro-batch wherever the
        # next sequence id is not the previous one + 1, so [1, 2, 0] would cost two passes over the weights.
        order = sorted(range(len(items)), key=lambda i: items[i].seq_id)
        prev = -1
        for i in order:
            item = items[i]
            self._ctx.check_seq(item.seq_id)
            if item.seq_id == prev:
                raise InvalidInputError(f"sequence {item.seq_id} appears twice in one batch")
            prev = item.seq_id
            if batch.n_tokens + len(item.tokens) > batch.capacity:
                raise InvalidInputError(f"batch exceeds n_batch {batch.capacity}")
            last = batch.add_sequence(item.tokens, self._ctx.seq_len(item.seq_id), item.seq_id, logits_last=item.logits)
            if item.logits:
                rows[i] = last
        self._ctx.decode(batch)
        return rows

    def set_sampler(self, seq_id: int, config: SamplerConfig) -> None:
        self._ctx.check_seq(seq_id)
        old = self._samplers.pop(seq_id, None)
        if old is not None:
            old.close()
        self._samplers[seq_id] = Sampler(self._model, config)

    def logits(self, row: int) -> npt.NDArray[np.float32]:
        return self._ctx.logits(row)

    def _sampler(self, seq_id: int) -> Sampler:
        """The sequence's sampler (greedy until set_sampler gives it another)."""
        self._ctx.check_seq(seq_id)
        sampler = self._samplers.get(seq_id)
        if sampler is None:
            sampler = self._samplers[seq_id] = Sampler(self._model)
        return sampler

    def sample(self, seq_id: int, row: int) -> int:
        return self._sampler(seq_id).sample(self._ctx, row)

    def sample_rows(self, picks: Sequence[tuple[int, int]]) -> list[int]:
        return sample_rows(self._ctx, [(self._sampler(seq_id), row) for seq_id, row in picks])

    def seq_len(self, seq_id: int) -> int:
        return self._ctx.seq_len(seq_id)

    def seq_truncate(self, seq_id: int, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` positions. A sliding-window cache without ``swa_full`` has already dropped
        cells that fell out of the window; when the kept sequence would need some of them to continue, this raises
        StateError and leaves the sequence empty (the caller goes cold instead of attending to a hole)."""
        self._ctx.seq_keep_first(seq_id, n_tokens)
        n_swa = self._model.info.n_swa
        if n_tokens > 0 and n_swa > 0 and not self._ctx.config.swa_full:
            first_needed = max(0, n_tokens - n_swa)
            if self._ctx.seq_pos_min(seq_id) > first_needed:
                self._ctx.seq_keep_first(seq_id, 0)
                raise StateError(
                    f"sequence {seq_id} cannot continue from position {n_tokens}: its sliding-window cache no longer "
                    f"holds position {first_needed}"
                )

    def state_get(self, seq_id: int) -> memoryview:
        return self._ctx.state_seq_get(seq_id)

    def state_set(self, seq_id: int, blob: bytes | memoryview) -> None:
        self._ctx.state_seq_set(blob, seq_id)

    def _decode_all(self, seq_id: int, tokens: Sequence[int]) -> Iterator[int]:
        """Decode ``tokens`` onto a sequence in chunks with an output at every position; yields each row."""
        ctx, batch = self._ctx, self._batch
        ctx.check_seq(seq_id)
        for off in range(0, len(tokens), batch.capacity):
            chunk = tokens[off : off + batch.capacity]
            batch.clear()
            pos0 = ctx.seq_len(seq_id)
            for i, token in enumerate(chunk):
                batch.add(token, pos0 + i, seq_id, logits=True)
            ctx.decode(batch)
            yield from range(len(chunk))

    def logits_rows(self, seq_id: int, tokens: Sequence[int]) -> Iterator[npt.NDArray[np.float32]]:
        self._model.check_tokens(tokens)
        for row in self._decode_all(seq_id, tokens):
            yield self._ctx.logits(row)

    def argmax_rows(self, seq_id: int, tokens: Sequence[int]) -> list[int]:
        return [int(np.argmax(self._ctx.logits(row))) for row in self._decode_all(seq_id, tokens)]

    def embed(self, seq_id: int, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        if not tokens:
            raise InvalidInputError("nothing to embed")
        self._model.check_tokens(tokens)  # TokenIdError, not an int32 overflow or llama.cpp's own refusal
        ctx = self._ctx
        ctx.set_embeddings(True)
        try:
            total = np.zeros(self._model.info.n_embd, dtype=np.float64)
            for row in self._decode_all(seq_id, tokens):
                total += ctx.embeddings(row)
        finally:
            ctx.set_embeddings(False)
        norm = float(np.linalg.norm(total))
        return (total / norm if norm > 0 else total).astype(np.float32)

    def load_adapter(self, path: str) -> object:
        return self._model.load_adapter(path)

    def set_adapters(self, adapters: Sequence[tuple[object, float]]) -> None:
        pairs: list[tuple[LoraAdapter, float]] = []
        for handle, scale in adapters:
            if not isinstance(handle, LoraAdapter):
                raise InvalidInputError("not an adapter of this backend")
            pairs.append((handle, scale))
        self._ctx.set_adapters(pairs)

    def free_adapter(self, handle: object) -> None:
        if isinstance(handle, LoraAdapter):
            handle.close()

    def abort(self) -> None:
        self._ctx.request_abort()

    def clear_abort(self) -> None:
        self._ctx.clear_abort()

    def close(self) -> None:
        """Free samplers, the context, then the model (on the worker thread). Idempotent."""
        for sampler in self._samplers.values():
            sampler.close()
        self._samplers.clear()
        self._ctx.close()
        self._model.close()
