"""A tiny, deterministic, random-weight llama model with a real SentencePiece (SPM) vocabulary.

Written with llama.cpp's own ``gguf`` writer, it is a few hundred KB and loads in milliseconds, yet exercises the
same code paths as a real model: the llama architecture with grouped-query attention, SPM tokenisation with
merges by score, byte-fallback tokens (every character outside the vocabulary, e.g. emoji, becomes ``<0xNN>``
pieces), whole-character CJK tokens, BOS/EOS control tokens and a ChatML chat template.

The output depends only on the seed and the ``TinyModelSpec``, so the same file is written on every machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TinyModelSpec",
    "spm_vocab",
    "tiny_model",
    "write_tiny_lora",
    "write_tiny_model",
]

_FORMAT_VERSION = 1  # bump when write_tiny_model() changes what it writes

# SentencePiece token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "be",
    "at",
    "by",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
    "after",
    "words",
    "called",
    "just",
    "where",
    "most",
    "know",
    "cache",
    "token",
    "prompt",
    "model",
    "hello",
    "world",
    "quick",
    "brown",
    "fox",
    "jumps",
    "lazy",
    "dog",
    "warm",
    "cold",
    "state",
    "prefix",
    "llama",
    "erllama",
]
_CJK = "世界你好日本語中文字"
_PUNCT = ".,!?;:'\"-()[]{}<>/\\@#$%^&*_+=|~`\n\t0123456789"
_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """Shape of the tiny model."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_head_kv: int = 1
    n_ff: int = 128
    n_ctx_train: int = 4096
    seed: int = 1234
    f16: bool = True

    def digest(self) -> str:
        """Names the file: changes whenever the spec, the vocabulary or the writer's format version does."""
        return hashlib.sha256(repr((_FORMAT_VERSION, self, spm_vocab())).encode()).hexdigest()[:12]


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of the SPM vocabulary: specials, 256 byte tokens, characters, word pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [_CONTROL, _CONTROL]
    pieces: list[str] = ["▁"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += list(_PUNCT) + list(_CJK)
    # Every prefix of "▁word" is a piece, so SPM's pairwise merges can always reach the whole word.
    for word in _WORDS:
        full = "▁" + word
        pieces += [full[:i] for i in range(2, len(full) + 1)]
    pieces += ["▁" + c for c in _CJK]
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(_NORMAL)
    # Longer pieces score higher so merges prefer them; ties broken by order, like a trained model's log-probs.
    scores = [0.0] * len(tokens)
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
        if typ == _NORMAL:
            scores[i] = -100.0 + 10.0 * len(tok) - i * 1e-3
    return tokens, scores, types


def write_tiny_model(path: str | os.PathLike[str], spec: TinyModelSpec | None = None) -> Path:
    """Write the tiny model to ``path`` (atomically) and return the path."""
    import gguf

    spec = spec or TinyModelSpec()
    n_vocab = len(spm_vocab()[0])

    rng = np.random.default_rng(spec.seed)
    wtype = np.float16 if spec.f16 else np.float32
    head_dim = spec.n_embd // spec.n_head
    n_embd_kv = head_dim * spec.n_head_kv

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(wtype)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    out = Path(path)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = llama_writer(
        tmp,
        "erllama-tiny",
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_head_kv=spec.n_head_kv,
        n_ff=spec.n_ff,
        n_ctx_train=spec.n_ctx_train,
        file_type=gguf.LlamaFileType.MOSTLY_F16 if spec.f16 else gguf.LlamaFileType.ALL_F32,
    )
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(_CHATML)

    s = 1.0 / np.sqrt(spec.n_embd)
    writer.add_tensor("token_embd.weight", mat(n_vocab, spec.n_embd, 1.0))
    for i in range(spec.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm(spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_q.weight", mat(spec.n_embd, spec.n_embd, s))
        writer.add_tensor(f"blk.{i}.attn_k.weight", mat(n_embd_kv, spec.n_embd, s))
        writer.add_tensor(f"blk.{i}.attn_v.weight", mat(n_embd_kv, spec.n_embd, s))
        writer.add_tensor(f"blk.{i}.attn_output.weight", mat(spec.n_embd, spec.n_embd, s))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm(spec.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", mat(spec.n_ff, spec.n_embd, s))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", mat(spec.n_ff, spec.n_embd, s))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", mat(spec.n_embd, spec.n_ff, 1.0 / np.sqrt(spec.n_ff)))
    writer.add_tensor("output_norm.weight", norm(spec.n_embd))
    writer.add_tensor("output.weight", mat(n_vocab, spec.n_embd, 3.0 * s))
    return finish_gguf(writer, tmp, out)


def llama_writer(
    tmp: Path,
    name: str,
    *,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_ctx_train: int = 4096,
    rope_base: float = 10000.0,
    eps: float = 1e-5,
    file_type: Any = None,
) -> Any:
    """A GGUF writer for a generated llama model: its hyperparameters and the SPM vocabulary, tensors still to add."""
    import gguf

    tokens, scores, types = spm_vocab()
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(eps)
    writer.add_vocab_size(len(tokens))
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    return writer


def finish_gguf(writer: Any, tmp: Path, out: Path) -> Path:
    """Write everything added to ``writer`` into ``tmp``, then move it to ``out`` in one rename."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def tiny_model(directory: str | os.PathLike[str] | None = None, spec: TinyModelSpec | None = None) -> Path:
    """The tiny model's path, writing it once into ``directory`` (default: the erllama model cache)."""
    from erllama.testing.fetch import models_dir

    spec = spec or TinyModelSpec()
    base = Path(directory) if directory is not None else models_dir()
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"erllama-tiny-{spec.digest()}.gguf"
    if not path.is_file():
        write_tiny_model(path, spec)
    return path


def write_tiny_lora(
    path: str | os.PathLike[str],
    spec: TinyModelSpec | None = None,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 99,
) -> Path:
    """Write a random LoRA adapter for the tiny model (attention Q and V of every layer)."""
    import gguf

    spec = spec or TinyModelSpec()
    rng = np.random.default_rng(seed)
    n_embd_kv = spec.n_embd // spec.n_head * spec.n_head_kv
    out = Path(path)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for i in range(spec.n_layer):
        for name, n_out in (("attn_q", spec.n_embd), ("attn_v", n_embd_kv)):
            a = (rng.standard_normal((rank, spec.n_embd)) * 0.5).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * 0.5).astype(np.float32)
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_b", b)
    return finish_gguf(writer, tmp, out)
