"""How a llama context is made: :class:`ContextConfig` and the enums of its fields (pure values: they import without
the native build)."""

from __future__ import annotations

import dataclasses
import enum

from erllama.errors import InvalidInputError

__all__ = ["ContextConfig", "FlashAttention", "KVType"]


class FlashAttention(enum.Enum):
    """Flash attention mode. On CPU it can slow decoding at depth for some models, so CPU builds default to OFF."""

    AUTO = -1
    OFF = 0
    ON = 1


class KVType(enum.Enum):
    """Element type of the K or V cache."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    IQ4_NL = 20
    BF16 = 30


@dataclasses.dataclass(frozen=True, slots=True)
class ContextConfig:
    """How to create a context. Every field that changes the KV layout also feeds the cache namespace.

    Attributes:
        n_ctx: total KV cells (0: the model's training context).
        n_batch: most tokens one decode call may carry.
        n_ubatch: physical micro-batch size.
        n_seq_max: sequences the context can hold at once.
        n_threads: threads for single-token decoding (None: all cores).
        n_threads_batch: threads for prompt processing (None: same as n_threads).
        flash_attn: flash attention mode (None: OFF on CPU builds, AUTO otherwise).
        type_k: K cache element type.
        type_v: V cache element type (quantised V needs flash attention).
        embeddings: also extract embeddings.
        kv_unified: one KV buffer shared by all sequences (else one stream per sequence).
        swa_full: keep full-size KV for sliding-window layers (needed to restore mid-window states).
        offload_kqv: keep the KV cache and KQV ops on the GPU when layers are offloaded.
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_threads: int | None = None
    n_threads_batch: int | None = None
    flash_attn: FlashAttention | None = None
    type_k: KVType = KVType.F16
    type_v: KVType = KVType.F16
    embeddings: bool = False
    kv_unified: bool = False
    swa_full: bool = True
    offload_kqv: bool = True

    def __post_init__(self) -> None:
        if self.n_ctx < 0 or self.n_batch < 1 or self.n_ubatch < 1 or self.n_seq_max < 1:
            raise InvalidInputError("n_ctx >= 0, n_batch >= 1, n_ubatch >= 1 and n_seq_max >= 1 are required")
        for name in ("n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInputError(f"{name} must be >= 1")
