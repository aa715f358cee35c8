"""Cache keys: a namespace plus the exact token ids, never text.

A row of the cache is the KV state of one token sequence, and it may only be restored into a context that would have
computed the very same state. The :class:`Namespace` pins down everything that decides that state besides the
tokens: which model file (its fingerprint), its quantisation, and every context parameter that changes the KV layout
(``n_ctx``, K/V types, ``n_seq_max`` and unified KV, flash attention, ``swa_full``) together with the LoRA adapters
attached and their scales. Two keys are equal exactly when their namespaces and token lists are equal.

Keys are built along a **block chain** so that the prefix index can find the longest cached prefix in one pass:
the tokens are cut into blocks of ``BLOCK_TOKENS``; block *i*'s hash covers the hash of block *i-1* and its own
tokens, the first block starting from the namespace digest. The key of a sequence of *n* tokens is the hash of
the chain value after its last full block and its remaining ``n % BLOCK_TOKENS`` tail tokens, so the key of every
prefix length falls out of one walk over the prompt.

Hashes are BLAKE2b-256 over little-endian int32 token ids; they are persisted in cache files, so this module's
encoding is part of the on-disk format (``KEY_SCHEME``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NewType

import numpy as np
import numpy.typing as npt

from erllama.errors import InvalidInputError

__all__ = [
    "BLOCK_TOKENS",
    "KEY_SCHEME",
    "BlockHash",
    "CacheKey",
    "FingerprintMode",
    "Namespace",
    "block_chain",
    "cache_key",
    "ctx_params_hash",
    "fingerprint",
    "prefix_keys",
]

KEY_SCHEME = 1
BLOCK_TOKENS = 16

CacheKey = NewType("CacheKey", bytes)
"""32 bytes naming one row: namespace + exact token ids."""
BlockHash = NewType("BlockHash", bytes)
"""32 bytes naming a namespace + a whole number of token blocks (a link of the chain)."""

_DIGEST = 32
_TOKEN_DTYPE = np.dtype("<i4")


def _h(*parts: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST)
    for part in parts:
        h.update(part)
    return h.digest()


class FingerprintMode(enum.Enum):
    """How a model file is identified.

    SAFE hashes the whole file (slow for big models, exact); GGUF_CHUNKED hashes the GGUF metadata, the tensor
    table and the first tensor's data (fast, and any re-quantisation or different weights change it); FAST_UNSAFE
    takes a caller-supplied fingerprint and trusts it.
    """

    SAFE = "safe"
    GGUF_CHUNKED = "gguf_chunked"
    FAST_UNSAFE = "fast_unsafe"


def fingerprint(
    path: str | os.PathLike[str],
    mode: FingerprintMode = FingerprintMode.GGUF_CHUNKED,
    supplied: str | None = None,
    *,
    memo: Path | None = None,
) -> str:
    """The model file's fingerprint (hex), per ``mode``.

    Results are memoised in ``memo`` (default ``$ERLLAMA_CACHE_DIR/fingerprints.json``) under the file's real path,
    device, inode, size and mtime in nanoseconds, so a file is hashed again only when it changes.
    """
    if mode is FingerprintMode.FAST_UNSAFE:
        if not supplied:
            raise InvalidInputError("fingerprint mode fast_unsafe needs a caller-supplied fingerprint")
        return supplied
    p = Path(path).resolve()
    st = p.stat()
    ident = f"{mode.value}:{p}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    memo_file = memo if memo is not None else _memo_file()
    known = _read_memo(memo_file)
    if ident in known:
        return known[ident]
    value = _fingerprint(p, mode)
    known[ident] = value
    _write_memo(memo_file, known)
    return value


_MEMO_MAX = 256


def _memo_file() -> Path:
    root = os.environ.get("ERLLAMA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "erllama") / "fingerprints.json"


def _read_memo(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_memo(path: Path, known: dict[str, str]) -> None:
    # keep the memo small: forget files that are gone, and keep the newest entries
    alive = {k: v for k, v in known.items() if os.path.exists(k.split(":", 1)[1].rsplit(":", 4)[0])}
    known = dict(list(alive.items())[-_MEMO_MAX:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(path)
    except OSError:
        pass  # memoising is an optimisation; a read-only cache dir only means hashing again next time


def _fingerprint(p: Path, mode: FingerprintMode) -> str:
    h = hashlib.blake2b(digest_size=_DIGEST)
    with p.open("rb") as fh:
        if mode is FingerprintMode.SAFE:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
            return h.hexdigest()
        import gguf  # the GGUF layout is llama.cpp's own reader's business, not ours

        reader = gguf.GGUFReader(p)
        data_offset = int(reader.data_offset)
        h.update(fh.read(data_offset))  # header, metadata and tensor table
        if reader.tensors:
            first = min(reader.tensors, key=lambda t: int(t.data_offset))
            fh.seek(int(first.data_offset))
            h.update(fh.read(int(first.n_bytes)))
        h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


def ctx_params_hash(params: Mapping[str, object]) -> str:
    """A stable hash (hex) of the context parameters that shape the KV state (canonical JSON of the mapping)."""
    try:
        text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=_json_default)
    except TypeError as exc:
        raise InvalidInputError(f"context parameters must be plain values: {exc}") from exc
    return _h(text.encode()).hex()


def _json_default(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.name
    raise TypeError(f"{type(value).__name__} is not a plain value")


@dataclasses.dataclass(frozen=True, slots=True)
class Namespace:
    """Everything besides the tokens that a restored state must match.

    Attributes:
        model_fingerprint: see :func:`fingerprint`.
        quantization: the model's file type name (e.g. ``Q4_1``).
        ctx_params: hash of the KV-shaping context parameters (see :func:`ctx_params_hash`).
        adapters: (adapter fingerprint, scale) for every attached LoRA adapter, in attach order.
        salt: free-form separation (e.g. a tenant); empty by default.
    """

    model_fingerprint: str
    quantization: str
    ctx_params: str
    adapters: tuple[tuple[str, float], ...] = ()
    salt: str = ""

    def __post_init__(self) -> None:
        if not self.model_fingerprint or not self.ctx_params:
            raise InvalidInputError("a namespace needs a model fingerprint and a context-parameter hash")

    def parts(self) -> dict[str, object]:
        """The namespace as plain values (stored in cache files)."""
        return {
            "scheme": KEY_SCHEME,
            "model": self.model_fingerprint,
            "quant": self.quantization,
            "ctx": self.ctx_params,
            "adapters": [[fp, float(scale)] for fp, scale in self.adapters],
            "salt": self.salt,
        }

    @classmethod
    def from_parts(cls, parts: Mapping[str, object]) -> Namespace:
        adapters = parts.get("adapters", [])
        if not isinstance(adapters, list):
            raise InvalidInputError("namespace adapters must be a list")
        return cls(
            model_fingerprint=str(parts["model"]),
            quantization=str(parts["quant"]),
            ctx_params=str(parts["ctx"]),
            adapters=tuple((str(fp), float(scale)) for fp, scale in adapters),
            salt=str(parts.get("salt", "")),
        )

    def digest(self) -> bytes:
        """The root of every block chain in this namespace."""
        return _h(b"erllama-ns\0", json.dumps(self.parts(), sort_keys=True, separators=(",", ":")).encode())


def token_array(tokens: Sequence[int] | npt.NDArray[np.integer]) -> npt.NDArray[np.int32]:
    """Validated little-endian int32 token ids (the encoding every hash of this module covers)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidInputError("tokens must be a flat sequence of ids")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > 2**31 - 1):
        raise InvalidInputError("token ids must be integers in [0, 2**31)")
    return arr.astype(_TOKEN_DTYPE, copy=False)


def block_chain(namespace: Namespace | bytes, tokens: Sequence[int] | npt.NDArray[np.integer]) -> Iterator[BlockHash]:
    """The chain hash after each full block of ``tokens`` (block 1, 2, ...), computed lazily in one pass."""
    prev = namespace.digest() if isinstance(namespace, Namespace) else namespace
    data = token_array(tokens).tobytes()
    step = BLOCK_TOKENS * 4
    for off in range(0, len(data) - step + 1, step):
        prev = _h(b"B", prev, data[off : off + step])
        yield BlockHash(prev)


def anchor_key(chain: bytes, tail: bytes) -> CacheKey:
    """The key of a sequence from the chain link after its last full block and its encoded tail tokens."""
    return CacheKey(_h(b"K", chain, tail))


def cache_key(namespace: Namespace | bytes, tokens: Sequence[int] | npt.NDArray[np.integer]) -> CacheKey:
    """The key of exactly these tokens in this namespace."""
    arr = token_array(tokens)
    root = namespace.digest() if isinstance(namespace, Namespace) else namespace
    links = list(block_chain(root, arr))
    chain = links[-1] if links else root
    n_full = (len(arr) // BLOCK_TOKENS) * BLOCK_TOKENS
    return anchor_key(chain, arr[n_full:].tobytes())


def prefix_keys(
    namespace: Namespace | bytes, tokens: Sequence[int] | npt.NDArray[np.integer], lengths: Sequence[int]
) -> dict[int, CacheKey]:
    """Keys of several prefixes of ``tokens`` (each length in [0, len(tokens)]), sharing one walk of the chain."""
    arr = token_array(tokens)
    wanted = sorted(set(lengths))
    if wanted and (wanted[0] < 0 or wanted[-1] > len(arr)):
        raise InvalidInputError("prefix lengths must lie within the token list")
    root = namespace.digest() if isinstance(namespace, Namespace) else namespace
    links = [root]
    max_block = wanted[-1] // BLOCK_TOKENS if wanted else 0
    for i, link in enumerate(block_chain(root, arr[: max_block * BLOCK_TOKENS]), start=1):
        links.append(link)
        if i >= max_block:
            break
    out = {}
    for n in wanted:
        b = n // BLOCK_TOKENS
        out[n] = anchor_key(links[b], arr[b * BLOCK_TOKENS : n].tobytes())
    return out
