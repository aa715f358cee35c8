"""``Model``: one loaded GGUF, its metadata, its vocabulary, and its LoRA adapters.

A model is read-only once loaded, so tokenisation and metadata may be used from any thread. Contexts hold a strong
reference to their model; ``Model.close()`` refuses while any context is still open, so a model is never freed
under a live KV cache, and the garbage collector never frees one (an unclosed model only warns).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erllama._native import errcheck
from erllama._native.loader import ffi, lib
from erllama._native.shim import x87_resetter
from erllama.errors import (
    AdapterError,
    ClosedError,
    InvalidInputError,
    ModelLoadError,
    ResourceBusyError,
    TokenIdError,
)
from erllama.text import utf8

__all__ = ["LoraAdapter", "Model", "ModelConfig", "ModelInfo"]

_GGUF_MAGIC = b"GGUF"
# llama_model_params.load_mode values (enum llama_load_mode)
_LOAD_MODE_NONE, _LOAD_MODE_MMAP, _LOAD_MODE_MLOCK, _LOAD_MODE_MMAP_MLOCK = 0, 1, 2, 3
_META_BUF = 1 << 16


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """How to load a model.

    Attributes:
        n_gpu_layers: layers to offload to the GPU; -1 offloads all, 0 keeps everything on the CPU.
        use_mmap: map the file instead of reading it.
        use_mlock: lock the weights in RAM.
        vocab_only: load only the vocabulary (tokenisation without weights).
        check_tensors: validate tensor data while loading (slow).
    """

    n_gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    vocab_only: bool = False
    check_tensors: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a loaded model says about itself."""

    path: str
    file_size_bytes: int
    description: str
    architecture: str
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_swa: int
    n_params: int
    size_bytes: int
    ftype: int
    quantization: str
    vocab_type: int
    bos: int
    eos: int
    eot: int
    add_bos: bool
    add_eos: bool
    eog_tokens: tuple[int, ...]
    chat_template: str | None
    is_recurrent: bool
    is_hybrid: bool


class LoraAdapter:
    """A LoRA adapter loaded for one model. Freed by ``close()`` or, at the latest, with its model."""

    def __init__(self, model: Model, handle: Any, path: str) -> None:
        self._model = model
        self._handle = handle
        self._attached = 0  # contexts that currently apply this adapter
        self.path = path

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise ClosedError(f"LoRA adapter {self.path} is closed")
        return self._handle

    @property
    def model(self) -> Model:
        return self._model

    @property
    def closed(self) -> bool:
        return self._handle is None

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the adapter file, as a string."""
        buf = ffi.new("char[]", _META_BUF)
        n = lib().llama_adapter_meta_val_str(self.handle, key.encode(), buf, _META_BUF)
        return None if n < 0 else ffi.string(buf).decode("utf-8", "replace")

    def close(self) -> None:
        """Free the adapter. Raises ResourceBusyError while a context applies it. Idempotent."""
        if self._attached:
            raise ResourceBusyError(f"LoRA adapter {self.path} is attached to {self._attached} context(s)")
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._model._adapters.discard(self)
            if not self._model.closed:
                lib().llama_adapter_lora_free(handle)


class Model:
    """A loaded GGUF model. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike[str], config: ModelConfig | None = None) -> None:
        self._handle: Any = None
        self._contexts = 0
        self._lock = threading.Lock()
        self._adapters: set[LoraAdapter] = set()
        self.config = config or ModelConfig()
        self.path = Path(path)
        _check_gguf_file(self.path)
        params = lib().llama_model_default_params()
        params.n_gpu_layers = self.config.n_gpu_layers
        params.load_mode = {
            (False, False): _LOAD_MODE_NONE,
            (True, False): _LOAD_MODE_MMAP,
            (False, True): _LOAD_MODE_MLOCK,
            (True, True): _LOAD_MODE_MMAP_MLOCK,
        }[(self.config.use_mmap, self.config.use_mlock)]
        params.vocab_only = self.config.vocab_only
        params.check_tensors = self.config.check_tensors
        errcheck.clear_last_error()
        x87_resetter()()  # loader threads start from this one (docs/runtime.md, "x87 state")
        handle = lib().llama_model_load_from_file(os.fsencode(self.path), params)
        if handle == ffi.NULL:
            raise ModelLoadError(f"could not load model {self.path}: {errcheck.last_error('unknown error')}")
        self._handle = handle
        self._vocab = lib().llama_model_get_vocab(handle)
        self.n_vocab = int(lib().llama_vocab_n_tokens(self._vocab))
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._max_piece: int | None = None
        self.info = self._read_info()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            warnings.warn(f"Model {self.path} was never closed; its memory is leaked", ResourceWarning, stacklevel=1)

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise ClosedError(f"model {self.path} is closed")
        return self._handle

    @property
    def vocab(self) -> Any:
        self.handle  # noqa: B018 - raises ClosedError once closed
        return self._vocab

    def close(self) -> None:
        """Free the model. Raises ResourceBusyError while contexts are open. Idempotent."""
        with self._lock:
            if self._handle is None:
                return
            if self._contexts:
                raise ResourceBusyError(f"model {self.path} still has {self._contexts} open context(s)")
            for adapter in list(self._adapters):
                adapter.close()
            handle, self._handle = self._handle, None
        lib().llama_model_free(handle)

    def _acquire(self) -> None:
        with self._lock:
            self.handle  # noqa: B018
            self._contexts += 1

    def _release(self) -> None:
        with self._lock:
            self._contexts -= 1

    # -- metadata --------------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string (None when absent; arrays are not supported by llama.cpp)."""
        buf = ffi.new("char[]", _META_BUF)
        n = lib().llama_model_meta_val_str(self.handle, key.encode(), buf, _META_BUF)
        return None if n < 0 else ffi.string(buf).decode("utf-8", "replace")

    def meta_items(self) -> dict[str, str]:
        """Every scalar metadata key and value."""
        out = {}
        buf = ffi.new("char[]", _META_BUF)
        for i in range(lib().llama_model_meta_count(self.handle)):
            if lib().llama_model_meta_key_by_index(self.handle, i, buf, _META_BUF) < 0:
                continue
            key = ffi.string(buf).decode("utf-8", "replace")
            if lib().llama_model_meta_val_str_by_index(self.handle, i, buf, _META_BUF) >= 0:
                out[key] = ffi.string(buf).decode("utf-8", "replace")
        return out

    def _read_info(self) -> ModelInfo:
        L, h, v = lib(), self._handle, self._vocab
        desc = ffi.new("char[]", 256)
        L.llama_model_desc(h, desc, 256)
        ftype = int(L.llama_model_ftype(h))
        tmpl = L.llama_model_chat_template(h, ffi.NULL)
        eog = tuple(t for t in range(self.n_vocab) if L.llama_vocab_is_eog(v, t))
        # Per-layer hyperparameters are not loaded for a vocab-only model; llama.cpp aborts if asked for them.
        has_layers = not self.config.vocab_only and int(L.llama_model_n_layer(h)) > 0
        return ModelInfo(
            path=str(self.path),
            file_size_bytes=self.path.stat().st_size,
            description=ffi.string(desc).decode("utf-8", "replace"),
            architecture=self.meta("general.architecture") or "",
            n_ctx_train=int(L.llama_model_n_ctx_train(h)),
            n_embd=int(L.llama_model_n_embd(h)),
            n_layer=int(L.llama_model_n_layer(h)),
            n_head=int(L.llama_model_n_head(h)) if has_layers else 0,
            n_head_kv=int(L.llama_model_n_head_kv(h)) if has_layers else 0,
            n_vocab=self.n_vocab,
            n_swa=int(L.llama_model_n_swa(h)),
            n_params=int(L.llama_model_n_params(h)),
            size_bytes=int(L.llama_model_size(h)),
            ftype=ftype,
            quantization=ffi.string(L.llama_ftype_name(ftype)).decode(),
            vocab_type=int(L.llama_vocab_type(v)),
            bos=int(L.llama_vocab_bos(v)),
            eos=int(L.llama_vocab_eos(v)),
            eot=int(L.llama_vocab_eot(v)),
            add_bos=bool(L.llama_vocab_get_add_bos(v)),
            add_eos=bool(L.llama_vocab_get_add_eos(v)),
            eog_tokens=eog,
            chat_template=None if tmpl == ffi.NULL else ffi.string(tmpl).decode("utf-8", "replace"),
            is_recurrent=bool(L.llama_model_is_recurrent(h)),
            is_hybrid=bool(L.llama_model_is_hybrid(h)),
        )

    # -- vocabulary ------------------------------------------------------------------------------------------

    def check_tokens(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Raise TokenIdError unless every id is in [0, n_vocab)."""
        if len(tokens) == 0:
            return
        arr = np.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise TokenIdError(lo, self.n_vocab)
        if hi >= self.n_vocab:
            raise TokenIdError(hi, self.n_vocab)

    def _check_token(self, token: int) -> int:
        if not 0 <= token < self.n_vocab:
            raise TokenIdError(token, self.n_vocab)
        return token

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids.

        Args:
            text: the text (str is encoded as UTF-8).
            add_special: add BOS/EOS as the model's metadata asks.
            parse_special: treat special-token text (e.g. ``<|im_start|>``) as those tokens instead of plain text.
        """
        data = utf8(text, "the prompt") if isinstance(text, str) else bytes(text)
        if len(data) >= 2**31 - 1:
            raise InvalidInputError(f"text of {len(data)} bytes is too long to tokenize")
        capacity = len(data) + 8
        while True:
            buf = ffi.new("llama_token[]", capacity)
            n = lib().llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
            if n >= 0:
                return list(ffi.unpack(buf, n))
            if -n <= capacity:  # pragma: no cover - llama.cpp reports a larger need or succeeds
                raise InvalidInputError("llama_tokenize failed (text too long?)")
            capacity = -n

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes one token stands for (may be part of a UTF-8 sequence for byte-fallback tokens)."""
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            self._check_token(token)
            buf = ffi.new("char[]", 64)
            n = lib().llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ffi.new("char[]", -n)
                n = lib().llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            piece = ffi.unpack(buf, n)
            self._pieces[key] = piece
        return piece

    def max_piece_bytes(self) -> int:
        """The longest piece any token renders to (special tokens included), in bytes: a text of ``n`` bytes
        tokenizes to at least ``n / max_piece_bytes()`` tokens, which bounds a prompt before it is tokenized.
        One pass over the vocabulary, computed once."""
        if self._max_piece is None:
            L, vocab = lib(), self.vocab
            buf = ffi.new("char[]", 256)
            longest = 1
            for token in range(self.n_vocab):
                n = L.llama_token_to_piece(vocab, token, buf, 256, 0, True)
                longest = max(longest, n if n >= 0 else -n)
            self._max_piece = longest
        return self._max_piece

    def detokenize_bytes(
        self, tokens: Sequence[int], *, remove_special: bool = False, unparse_special: bool = False
    ) -> bytes:
        """Token ids to the exact bytes llama.cpp renders for them."""
        self.check_tokens(tokens)
        if not tokens:
            return b""
        arr = ffi.new("llama_token[]", list(tokens))
        capacity = max(16, 8 * len(tokens))
        while True:
            buf = ffi.new("char[]", capacity)
            n = lib().llama_detokenize(self.vocab, arr, len(tokens), buf, capacity, remove_special, unparse_special)
            if n >= 0:
                return bytes(ffi.unpack(buf, n))
            capacity = -n

    def detokenize(self, tokens: Sequence[int], *, remove_special: bool = False, unparse_special: bool = False) -> str:
        """Token ids to text; bytes that do not form valid UTF-8 become U+FFFD."""
        raw = self.detokenize_bytes(tokens, remove_special=remove_special, unparse_special=unparse_special)
        return raw.decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        """The vocabulary's own text for a token (SPM pieces keep their ``▁``)."""
        self._check_token(token)
        return str(ffi.string(lib().llama_vocab_get_text(self.vocab, token)).decode("utf-8", "replace"))

    def token_attr(self, token: int) -> int:
        self._check_token(token)
        return int(lib().llama_vocab_get_attr(self.vocab, token))

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        self._check_token(token)
        return bool(lib().llama_vocab_is_eog(self.vocab, token))

    def is_control(self, token: int) -> bool:
        self._check_token(token)
        return bool(lib().llama_vocab_is_control(self.vocab, token))

    def apply_chat_template(
        self, messages: Iterable[tuple[str, str]], *, add_assistant: bool = True, template: str | None = None
    ) -> str:
        """Format messages with one of llama.cpp's built-in templates (the model's own by default).

        Only templates llama.cpp recognises are supported; Jinja rendering is the runtime's job.
        """
        tmpl = template if template is not None else self.info.chat_template
        if tmpl is None:
            raise InvalidInputError(f"model {self.path} has no chat template; pass one")
        msgs = list(messages)
        keep = [(ffi.new("char[]", utf8(r, "a role")), ffi.new("char[]", utf8(c, "a message"))) for r, c in msgs]
        chat = ffi.new("llama_chat_message[]", len(keep))
        for i, (r, c) in enumerate(keep):
            chat[i].role, chat[i].content = r, c
        size = 256 + 2 * sum(len(r) + len(c) for r, c in msgs)
        while True:
            buf = ffi.new("char[]", size)
            n = lib().llama_chat_apply_template(utf8(tmpl, "the template"), chat, len(keep), add_assistant, buf, size)
            if n < 0:
                raise InvalidInputError("llama.cpp does not support this chat template")
            if n <= size:
                return str(ffi.unpack(buf, n).decode("utf-8", "replace"))
            size = n

    # -- adapters --------------------------------------------------------------------------------------------

    def load_adapter(self, path: str | os.PathLike[str]) -> LoraAdapter:
        """Load a LoRA adapter (GGUF) for this model."""
        p = Path(path)
        try:
            _check_gguf_file(p)
        except ModelLoadError as exc:
            raise AdapterError(str(exc)) from exc
        errcheck.clear_last_error()
        handle = lib().llama_adapter_lora_init(self.handle, os.fsencode(p))
        if handle == ffi.NULL:
            raise AdapterError(f"could not load LoRA adapter {p}: {errcheck.last_error('unknown error')}")
        adapter = LoraAdapter(self, handle, str(p))
        self._adapters.add(adapter)
        return adapter


def _check_gguf_file(path: Path) -> None:
    """Refuse what llama.cpp would choke on before it gets the chance: missing, unreadable, not GGUF."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise ModelLoadError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelLoadError(f"model path {path} is a directory") from None
    except OSError as exc:
        raise ModelLoadError(f"could not read model file {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r})")
