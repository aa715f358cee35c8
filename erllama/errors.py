"""The one exception tree of erllama.

Every error erllama raises derives from :class:`ErllamaError`. Where callers expect a standard library base, the
class derives from it too, so ``except ValueError`` keeps working for bad input and ``except OSError`` for files::

    ErllamaError
    ├── InvalidInputError (ValueError)       bad arguments, caught before any C call
    │   ├── TokenIdError                     a token id outside [0, n_vocab)
    │   ├── SeqIdError                       a sequence id outside [0, n_seq_max)
    │   ├── ContextOverflowError             the tokens would not fit the sequence's room in the KV cache
    │   ├── PromptTooLongError               a request's prompt (and reply length) exceeds the model's context
    │   ├── ModelExistsError                 a model id that is already loaded
    │   ├── SchemaError                      a JSON schema that cannot be turned into a grammar
    │   ├── RefusedSourceError               a pull source erllama will not fetch from (scheme, host, path)
    │   └── UnknownModelError (KeyError)     a model id that is not loaded
    ├── ClosedError (ValueError)             a Model / Context / Sampler used after close()
    ├── ThreadAffinityError (RuntimeError)   a Context touched from a thread other than its owner
    ├── ResourceBusyError (RuntimeError)     a Model closed while contexts still use it
    ├── WorkerStoppedError (RuntimeError)    a model worker stopped or crashed before a request finished
    ├── RequestFailedError (RuntimeError)    one request failed inside its worker (the worker and the rest go on)
    ├── NoGpuError (RuntimeError)            GPU information asked of a CPU-only build or machine
    ├── OverloadedError (RuntimeError)       a model's queue is full or a request waited too long for a slot
    ├── DaemonUnavailableError (ConnectionError) no erllama daemon answers at the address the CLI was given
    ├── StoreError (OSError)                 the model store
    │   ├── DownloadError                    a transfer failed or was refused (what arrived is kept to resume)
    │   └── ChecksumError                    fetched bytes whose sha256 (or format) is not what was promised
    ├── CacheError                           the KV-state cache
    │   ├── CorruptCacheFileError (ValueError) a KVC file that is truncated, altered or not one (fields: reason)
    │   └── UnknownCacheRowError (KeyError)  a cache key (prefix) naming no stored row, or several
    └── NativeError (RuntimeError)           llama.cpp reported a failure
        ├── LibraryError (ImportError)       libllama missing, not built, or its ABI does not match the cdef
        ├── ModelLoadError (OSError)         a GGUF that is missing, unreadable or corrupt
        ├── ContextCreateError               llama_init_from_model() returned NULL
        ├── DecodeError                      llama_decode() failed (fields: code)
        │   ├── KVCacheFullError             code 1: no KV slot for the batch
        │   └── DecodeAbortedError           code 2: the abort callback asked to stop
        ├── StateError                       a sequence state could not be read or restored
        ├── SamplerError                     a sampler could not be built (e.g. a grammar that does not parse)
        └── AdapterError (OSError)           a LoRA adapter that could not be loaded or applied
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "CacheError",
    "ChecksumError",
    "ClosedError",
    "ContextCreateError",
    "ContextOverflowError",
    "CorruptCacheFileError",
    "DaemonUnavailableError",
    "DecodeAbortedError",
    "DecodeError",
    "DownloadError",
    "ErllamaError",
    "InvalidInputError",
    "KVCacheFullError",
    "LibraryError",
    "ModelExistsError",
    "ModelLoadError",
    "NativeError",
    "NoGpuError",
    "OverloadedError",
    "PromptTooLongError",
    "RefusedSourceError",
    "RequestFailedError",
    "ResourceBusyError",
    "SamplerError",
    "SchemaError",
    "SeqIdError",
    "StateError",
    "StoreError",
    "ThreadAffinityError",
    "TokenIdError",
    "UnknownCacheRowError",
    "UnknownModelError",
    "WorkerStoppedError",
]


class ErllamaError(Exception):
    """Base of every error erllama raises."""


class InvalidInputError(ErllamaError, ValueError):
    """Input that would be unsafe or meaningless to hand to llama.cpp."""


class TokenIdError(InvalidInputError):
    """A token id outside the vocabulary."""

    def __init__(self, token: int, n_vocab: int) -> None:
        super().__init__(f"token id {token} is outside the vocabulary [0, {n_vocab})")
        self.token = token
        self.n_vocab = n_vocab


class SeqIdError(InvalidInputError):
    """A sequence id outside the context's sequences."""

    def __init__(self, seq_id: int, n_seq_max: int) -> None:
        super().__init__(f"sequence id {seq_id} is outside [0, {n_seq_max})")
        self.seq_id = seq_id
        self.n_seq_max = n_seq_max


class ContextOverflowError(InvalidInputError):
    """The tokens would not fit the room left for the sequence in the KV cache."""

    def __init__(self, seq_id: int, needed: int, n_ctx_seq: int) -> None:
        super().__init__(f"sequence {seq_id} would need {needed} positions; the context holds {n_ctx_seq} per sequence")
        self.seq_id = seq_id
        self.needed = needed
        self.n_ctx_seq = n_ctx_seq


class PromptTooLongError(InvalidInputError):
    """A request that does not fit the model's context: its prompt alone, or its prompt with the reply length it
    asked for. ``prompt_tokens`` is the prompt's length (a lower bound when ``at_least``: a text so long it was
    refused before tokenizing), ``max_tokens`` the reply length asked (None: not given), ``n_ctx`` the context."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, n_ctx: int, *, at_least: bool = False) -> None:
        size = f"{'at least ' if at_least else ''}{prompt_tokens} tokens"
        if max_tokens:
            msg = f"prompt of {size} + max_tokens {max_tokens} exceeds the {n_ctx}-token context"
        else:
            msg = f"prompt of {size} leaves no room for a reply in the {n_ctx}-token context"
        super().__init__(msg)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        self.at_least = at_least


class ModelExistsError(InvalidInputError):
    """A model id that is already loaded."""


class SchemaError(InvalidInputError):
    """A JSON schema (``response_format``, ``format``) that cannot be turned into a grammar."""


class RefusedSourceError(InvalidInputError):
    """A pull source that erllama does not fetch from: another scheme, plain HTTP off loopback, a bad path."""


class UnknownModelError(InvalidInputError, KeyError):
    """A model id that is not loaded."""

    def __str__(self) -> str:  # KeyError's own quotes its message ("'no such model'")
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ClosedError(ErllamaError, ValueError):
    """An object used after close()."""


class ThreadAffinityError(ErllamaError, RuntimeError):
    """A llama context used from a thread that does not own it."""


class ResourceBusyError(ErllamaError, RuntimeError):
    """A resource released while something still depends on it."""


class WorkerStoppedError(ErllamaError, RuntimeError):
    """A model worker stopped (or crashed) before the request finished."""


class RequestFailedError(ErllamaError, RuntimeError):
    """One request failed inside its model worker for a reason outside erllama's error tree (a bug): that request
    is answered with this; its sequence is freed, and the worker and the other requests go on."""


class NoGpuError(ErllamaError, RuntimeError):
    """GPU information was asked for, but the library was built for the CPU or sees no GPU device."""


class OverloadedError(ErllamaError, RuntimeError):
    """A model is too busy: its queue is full, or a request waited longer than allowed for a slot.

    Attributes:
        retry_after: seconds after which a retry is reasonable.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DaemonUnavailableError(ErllamaError, ConnectionError):
    """No erllama daemon answers at the address the CLI was given."""


class StoreError(ErllamaError, OSError):
    """A failure of the model store."""


class DownloadError(StoreError):
    """A download failed or the server refused it; the bytes that arrived are kept for the next pull to resume."""


class ChecksumError(StoreError):
    """Fetched bytes that are not what the source promised: a sha256 mismatch, or not a GGUF file."""


class CacheError(ErllamaError):
    """A failure of the KV-state cache."""


class CorruptCacheFileError(CacheError, ValueError):
    """A KVC file that cannot be trusted: truncated, bit-flipped, or not a KVC file at all."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.reason = reason
        self.path = path


class UnknownCacheRowError(CacheError, KeyError):
    """A cache key (or key prefix) that names no stored row, or more than one."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class NativeError(ErllamaError, RuntimeError):
    """llama.cpp reported a failure."""


class LibraryError(NativeError, ImportError):
    """libllama could not be found, loaded, or does not match the cdef's ABI."""


class ModelLoadError(NativeError, OSError):
    """A model file could not be loaded."""


class ContextCreateError(NativeError):
    """A llama context could not be created."""


class DecodeError(NativeError):
    """llama_decode() returned a failure code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class KVCacheFullError(DecodeError):
    """No KV slot could be found for the batch (llama_decode returned 1)."""


class DecodeAbortedError(DecodeError):
    """The abort callback stopped the decode (llama_decode returned 2)."""


class StateError(NativeError):
    """A sequence state blob could not be produced or restored."""


class SamplerError(NativeError):
    """A sampler could not be created."""


class AdapterError(NativeError, OSError):
    """A LoRA adapter could not be loaded or applied."""
