"""``ModelBackend``: what a model worker needs from a model, whatever runs it.

Two implementations: :class:`~erllama.model.llama.LlamaBackend` over the native binding, and
:class:`~erllama.model.stub.StubBackend`, a deterministic pure-Python model for fast tests of the worker,
admission, batching and cache policy. A backend is confined to the worker thread that created it, exactly like the
llama context inside it; only :meth:`ModelBackend.abort` may be called from another thread.

One decode call carries any mix of sequences (continuous batching): each :class:`DecodeItem` appends tokens to
the end of one sequence and may ask for logits of its last token, which the call returns as an output row for
:meth:`ModelBackend.sample`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from erllama.sampling import SamplerConfig

__all__ = ["BackendInfo", "DecodeItem", "ModelBackend", "SamplerConfig", "TokenLogprob", "token_logprob"]


@dataclasses.dataclass(frozen=True, slots=True)
class BackendInfo:
    """What the worker and the cache need to know about a loaded model."""

    name: str
    n_vocab: int
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    bos: int
    add_bos: bool
    eog_tokens: frozenset[int]
    fingerprint: str
    quantization: str
    ctx_params: Mapping[str, object]
    chat_template: str | None = None
    bos_text: str = ""
    eos_text: str = ""
    """The texts of the BOS and EOS tokens (a Jinja chat template's ``bos_token`` / ``eos_token``)."""
    last_token_foldable: bool = False
    """True when decoding the last prompt token inside the final prefill chunk gives bit for bit the logits of a
    one-token step (batch-invariant kernels, checked at load) and restored rows can be cut back: the worker then
    skips the separate last-token step on cold and partial paths (see ``worker.py``)."""
    max_token_bytes: int = 0
    """The longest piece a token renders to, in bytes (0: unknown). A text prompt longer than ``n_ctx_seq`` times
    this cannot fit the context, whatever it tokenizes to: the worker refuses it without tokenizing it."""
    gguf_path: str | None = None
    """The GGUF file the model was loaded from, when it has one (the server reads its header for metadata)."""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log-probability of a sampled token under the model's distribution (softmax of the raw logits, before
    any sampler), with the ``top`` most likely alternatives as (token, piece, logprob), most likely first."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


def token_logprob(
    logits: npt.NDArray[np.floating[Any]], token: int, top_n: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """:class:`TokenLogprob` of ``token`` from a row of logits."""
    x = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(x)
    m = float(x[finite].max()) if finite.any() else 0.0
    lse = m + float(np.log(np.exp(x[finite] - m).sum()))
    top: tuple[tuple[int, bytes, float], ...] = ()
    if top_n > 0:
        k = min(top_n, x.size)
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = tuple((int(i), piece(int(i)), float(x[i] - lse)) for i in idx)
    return TokenLogprob(token, piece(token), float(x[token] - lse), top)


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeItem:
    """Tokens appended to the end of one sequence; ``logits`` asks for an output row for the last one."""

    seq_id: int
    tokens: Sequence[int]
    logits: bool = True


class ModelBackend(Protocol):
    """A model with a KV cache of ``n_seq_max`` sequences."""

    @property
    def info(self) -> BackendInfo: ...

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]: ...

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token renders as (possibly part of a UTF-8 sequence)."""
        ...

    def apply_chat_template(self, messages: Sequence[tuple[str, str]], *, add_assistant: bool = True) -> str:
        """Render (role, content) messages with the model's chat template."""
        ...

    def decode(self, items: Sequence[DecodeItem]) -> list[int | None]:
        """Run one batch; for each item, its output row (or None when it asked for no logits)."""
        ...

    def set_sampler(self, seq_id: int, config: SamplerConfig) -> None:
        """Give a sequence its own sampler (penalties, grammar and RNG state are per sequence)."""
        ...

    def logits(self, row: int) -> npt.NDArray[np.float32]:
        """A copy of the logits of output row ``row`` of the last decode."""
        ...

    def sample(self, seq_id: int, row: int) -> int:
        """Pick the next token of ``seq_id`` from output row ``row`` of the last decode."""
        ...

    def sample_rows(self, picks: Sequence[tuple[int, int]]) -> list[int]:
        """``[sample(seq_id, row) for seq_id, row in picks]``, done together where the backend can (one step's rows)."""
        ...

    def seq_len(self, seq_id: int) -> int: ...

    def seq_truncate(self, seq_id: int, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` positions of a sequence (0 empties it)."""
        ...

    def state_get(self, seq_id: int) -> memoryview:
        """The sequence's state, to be restored by :meth:`state_set` (possibly into another sequence)."""
        ...

    def state_set(self, seq_id: int, blob: bytes | memoryview) -> None: ...

    def argmax_rows(self, seq_id: int, tokens: Sequence[int]) -> list[int]:
        """Append ``tokens`` to a sequence with an output at every position; the argmax token of each (verify)."""
        ...

    def logits_rows(self, seq_id: int, tokens: Sequence[int]) -> Iterator[npt.NDArray[np.float32]]:
        """Decode ``tokens`` onto a sequence; yields the logits after each of them (prompt scoring)."""
        ...

    def embed(self, seq_id: int, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Decode ``tokens`` into an empty sequence and return their mean-pooled, L2-normalised embedding."""
        ...

    def load_adapter(self, path: str) -> object:
        """Load a LoRA adapter file; the handle is passed to :meth:`set_adapters` and :meth:`free_adapter`."""
        ...

    def set_adapters(self, adapters: Sequence[tuple[object, float]]) -> None:
        """Apply exactly these adapters with these scales."""
        ...

    def free_adapter(self, handle: object) -> None: ...

    def abort(self) -> None:
        """Stop a running decode as soon as possible (any thread)."""
        ...

    def clear_abort(self) -> None: ...

    def close(self) -> None: ...
