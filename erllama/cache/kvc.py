"""KVC v2: the file format of one cache row (a sequence's KV state plus what it is the state of).

The byte layout is documented once, in ``docs/cache.md``. In short: a fixed 36-byte header, a TLV metadata section,
the payload (the state bytes, raw or zstd-compressed), and an 8-byte trailer holding the payload's XXH3-64. The
header carries its own checksum over itself and the TLV section, so :func:`read_meta` can trust the metadata after
one bounded read of ``HEADER_SIZE + tlv_len`` bytes, without touching the payload; :func:`read_row` reads the whole
file once into one buffer and checks the payload once.

Unknown TLV tags are skipped (newer writers may add fields); anything truncated, altered or inconsistent raises
:class:`~erllama.errors.CorruptCacheFileError` saying what is wrong.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import xxhash

from erllama.cache.key import CacheKey, Namespace
from erllama.errors import CorruptCacheFileError

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "TRAILER_SIZE",
    "VERSION",
    "RowMeta",
    "SaveReason",
    "Tag",
    "decode",
    "encode",
    "file_name",
    "open_row_file",
    "path_for",
    "read_meta",
    "read_row",
    "write_segments",
]

MAGIC = b"KVC\x00"
VERSION = 2
# magic, version u16, flags u16, tlv_len u32, payload_len u64, raw_len u64, header_xxh3 u64
_HEADER = struct.Struct("<4sHHIQQQ")
HEADER_SIZE = _HEADER.size  # 36 bytes
TRAILER_SIZE = 8
_FLAG_ZSTD = 1
_KNOWN_FLAGS = _FLAG_ZSTD
_TLV = struct.Struct("<HI")
_MAX_TLV = 1 << 30


class Tag(enum.IntEnum):
    """TLV tags. New tags may be added; readers skip the ones they do not know."""

    KEY = 1  # 32 bytes
    NAMESPACE = 2  # canonical JSON of Namespace.parts()
    N_TOKENS = 3  # u32
    TOKENS = 4  # n_tokens little-endian int32
    SAVE_REASON = 5  # u8, SaveReason
    CREATED_NS = 6  # u64, wall clock
    LAST_USED_NS = 7  # u64, wall clock
    HIT_COUNT = 8  # u64
    PRODUCER = 9  # UTF-8, e.g. "erllama 0.1.0"


class SaveReason(enum.IntEnum):
    """Why a row was written."""

    COLD = 1
    CONTINUED = 2
    FINISH = 3
    EVICT = 4
    SHUTDOWN = 5
    MANUAL = 6


@dataclasses.dataclass(frozen=True, slots=True)
class RowMeta:
    """What a row is the state of."""

    key: CacheKey
    namespace: Namespace
    tokens: tuple[int, ...]
    save_reason: SaveReason
    created_ns: int
    last_used_ns: int = 0
    hit_count: int = 0
    producer: str = ""

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True, slots=True)
class _Header:
    flags: int
    tlv_len: int
    payload_len: int
    raw_len: int

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + self.tlv_len + self.payload_len + TRAILER_SIZE


def _tlv(tag: Tag, value: bytes) -> bytes:
    return _TLV.pack(tag, len(value)) + value


def _encode_meta(meta: RowMeta) -> bytes:
    namespace = json.dumps(meta.namespace.parts(), sort_keys=True, separators=(",", ":")).encode()
    tokens = np.asarray(meta.tokens, dtype="<i4").tobytes()
    return b"".join(
        [
            _tlv(Tag.KEY, bytes(meta.key)),
            _tlv(Tag.NAMESPACE, namespace),
            _tlv(Tag.N_TOKENS, struct.pack("<I", len(meta.tokens))),
            _tlv(Tag.TOKENS, tokens),
            _tlv(Tag.SAVE_REASON, struct.pack("<B", meta.save_reason)),
            _tlv(Tag.CREATED_NS, struct.pack("<Q", meta.created_ns)),
            _tlv(Tag.LAST_USED_NS, struct.pack("<Q", meta.last_used_ns)),
            _tlv(Tag.HIT_COUNT, struct.pack("<Q", meta.hit_count)),
            _tlv(Tag.PRODUCER, meta.producer.encode()),
        ]
    )


def encode(
    meta: RowMeta,
    payload: bytes | bytearray | memoryview,
    *,
    compress_level: int | None = None,
) -> list[bytes | memoryview]:
    """The file's bytes as segments to write in order (the raw payload is passed through without a copy).

    Args:
        meta: what the row is.
        payload: the state bytes.
        compress_level: zstd level, or None to store the payload raw.
    """
    view = memoryview(payload).cast("B")
    raw_len = len(view)
    flags = 0
    body: bytes | memoryview = view
    if compress_level is not None:
        import zstandard

        body = zstandard.ZstdCompressor(level=compress_level).compress(view)
        flags |= _FLAG_ZSTD
    tlv = _encode_meta(meta)
    head = _HEADER.pack(MAGIC, VERSION, flags, len(tlv), len(body), raw_len, 0)
    digest = xxhash.xxh3_64_intdigest(head[:-8] + tlv)
    head = head[:-8] + struct.pack("<Q", digest)
    trailer = struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    return [head + tlv, body, trailer]


def _parse_header(data: bytes | memoryview, path: str | None) -> _Header:
    if len(data) < HEADER_SIZE:
        raise CorruptCacheFileError(f"truncated header ({len(data)} of {HEADER_SIZE} bytes)", path)
    magic, version, flags, tlv_len, payload_len, raw_len, _digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptCacheFileError(f"not a KVC file (magic {bytes(magic)!r})", path)
    if version != VERSION:
        raise CorruptCacheFileError(f"unsupported KVC version {version} (this reader knows {VERSION})", path)
    if flags & ~_KNOWN_FLAGS:
        raise CorruptCacheFileError(f"unknown header flags {flags:#x}", path)
    if tlv_len > _MAX_TLV:
        raise CorruptCacheFileError(f"implausible metadata length {tlv_len}", path)
    if not flags & _FLAG_ZSTD and payload_len != raw_len:
        raise CorruptCacheFileError(f"raw payload of {payload_len} bytes claims {raw_len} bytes of state", path)
    return _Header(flags=flags, tlv_len=tlv_len, payload_len=payload_len, raw_len=raw_len)


def _check_header_digest(data: bytes | memoryview, header: _Header, path: str | None) -> None:
    end = HEADER_SIZE + header.tlv_len
    if len(data) < end:
        raise CorruptCacheFileError(f"truncated metadata ({len(data) - HEADER_SIZE} of {header.tlv_len} bytes)", path)
    (stored,) = struct.unpack_from("<Q", data, HEADER_SIZE - 8)
    h = xxhash.xxh3_64()
    h.update(data[: HEADER_SIZE - 8])
    h.update(data[HEADER_SIZE:end])
    if h.intdigest() != stored:
        raise CorruptCacheFileError("header or metadata checksum mismatch", path)


def _parse_meta(tlv: bytes | memoryview, path: str | None) -> RowMeta:
    fields: dict[int, bytes] = {}
    off = 0
    while off < len(tlv):
        if off + _TLV.size > len(tlv):
            raise CorruptCacheFileError("metadata entry header runs past the metadata section", path)
        tag, length = _TLV.unpack_from(tlv, off)
        off += _TLV.size
        if off + length > len(tlv):
            raise CorruptCacheFileError(f"metadata entry {tag} runs past the metadata section", path)
        if tag in fields:
            raise CorruptCacheFileError(f"metadata entry {tag} appears twice", path)
        fields[tag] = bytes(tlv[off : off + length])
        off += length
    try:
        return _meta_from_fields(fields)
    except KeyError as exc:
        raise CorruptCacheFileError(f"metadata entry {Tag(exc.args[0]).name} is missing", path) from None
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CorruptCacheFileError(f"malformed metadata: {exc}", path) from None


def _meta_from_fields(fields: dict[int, bytes]) -> RowMeta:
    (n_tokens,) = struct.unpack("<I", fields[Tag.N_TOKENS])
    tokens = fields[Tag.TOKENS]
    if len(tokens) != 4 * n_tokens:
        raise ValueError(f"{len(tokens)} token bytes for {n_tokens} tokens")
    key = fields[Tag.KEY]
    if len(key) != 32:
        raise ValueError(f"key of {len(key)} bytes")
    parts = json.loads(fields[Tag.NAMESPACE].decode())
    if not isinstance(parts, dict):
        raise ValueError("namespace is not an object")

    def u64(tag: Tag, default: int = 0) -> int:
        return int(struct.unpack("<Q", fields[tag])[0]) if tag in fields else default

    return RowMeta(
        key=CacheKey(key),
        namespace=Namespace.from_parts(parts),
        tokens=tuple(int(t) for t in np.frombuffer(tokens, dtype="<i4")),
        save_reason=SaveReason(struct.unpack("<B", fields[Tag.SAVE_REASON])[0]),
        created_ns=u64(Tag.CREATED_NS),
        last_used_ns=u64(Tag.LAST_USED_NS),
        hit_count=u64(Tag.HIT_COUNT),
        producer=fields.get(Tag.PRODUCER, b"").decode(),
    )


def decode(data: bytes | bytearray | memoryview, path: str | None = None) -> tuple[RowMeta, memoryview]:
    """Parse and verify a whole file held in memory; returns the metadata and the (decompressed) state bytes."""
    view = memoryview(data).cast("B")
    header = _parse_header(view, path)
    _check_header_digest(view, header, path)
    if len(view) < header.file_size:
        raise CorruptCacheFileError(f"truncated payload ({len(view)} of {header.file_size} bytes)", path)
    if len(view) > header.file_size:
        raise CorruptCacheFileError(f"{len(view) - header.file_size} unexpected bytes after the trailer", path)
    meta = _parse_meta(view[HEADER_SIZE : HEADER_SIZE + header.tlv_len], path)
    start = HEADER_SIZE + header.tlv_len
    body = view[start : start + header.payload_len]
    (stored,) = struct.unpack_from("<Q", view, start + header.payload_len)
    if xxhash.xxh3_64_intdigest(body) != stored:
        raise CorruptCacheFileError("payload checksum mismatch", path)
    if header.flags & _FLAG_ZSTD:
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=header.raw_len)
        except zstandard.ZstdError as exc:
            raise CorruptCacheFileError(f"payload does not decompress: {exc}", path) from None
        if len(raw) != header.raw_len:
            raise CorruptCacheFileError(f"payload decompressed to {len(raw)} bytes, expected {header.raw_len}", path)
        return meta, memoryview(raw)
    return meta, body


def open_row_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a row file for reading: a regular file only, never through a symlink, never blocking on a FIFO or a
    device (``O_NOFOLLOW | O_NONBLOCK``, then ``fstat``). Anything else raises CorruptCacheFileError; a missing
    file FileNotFoundError; other I/O errors (EACCES, EIO, ...) their OSError."""
    p = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise CorruptCacheFileError("a symbolic link, not a row file", p) from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):  # a directory; a socket or a FIFO without a writer
            raise CorruptCacheFileError("not a regular file", p) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptCacheFileError("not a regular file", p)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_meta(path: str | os.PathLike[str]) -> tuple[RowMeta, int]:
    """The row's metadata and its file size, from one bounded read that stops before the payload. A header that
    claims another size than the file has is corrupt (the scan budgets rows by it)."""
    p = str(path)
    with open_row_file(p) as fh:
        actual = os.fstat(fh.fileno()).st_size
        head = fh.read(HEADER_SIZE)
        header = _parse_header(head, p)
        tlv = fh.read(header.tlv_len)
    data = head + tlv
    _check_header_digest(data, header, p)
    if header.file_size != actual:
        raise CorruptCacheFileError(f"header claims {header.file_size} bytes; the file has {actual}", p)
    return _parse_meta(memoryview(data)[HEADER_SIZE:], p), header.file_size


def read_row(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> tuple[RowMeta, memoryview]:
    """Read a whole row file in one read into one buffer, verify it once, and return its metadata and state."""
    p = str(path)
    with open_row_file(p) as fh:
        size = os.fstat(fh.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise CorruptCacheFileError(f"file of {size} bytes exceeds the {max_bytes}-byte bound", p)
        buf = np.empty(size, dtype=np.uint8)
        n = _read_into(fh, buf)
    if n != size:
        raise CorruptCacheFileError(f"file shrank while being read ({n} of {size} bytes)", p)
    return decode(buf.data, p)


def _read_into(fh: BinaryIO, buf: npt.NDArray[np.uint8]) -> int:
    view = buf.data
    total = 0
    while total < len(view):
        n = fh.readinto(view[total:])  # type: ignore[attr-defined]
        if not n:
            break
        total += n
    return total


def write_segments(fh: BinaryIO, segments: Sequence[bytes | memoryview]) -> int:
    """Write the segments of :func:`encode` in order; returns the bytes written."""
    total = 0
    for seg in segments:
        fh.write(seg)
        total += len(seg)
    return total


def file_name(key: CacheKey) -> str:
    """The file name of a row: its key in hex with the ``.kvc`` suffix."""
    return bytes(key).hex() + ".kvc"


def path_for(root: Path, key: CacheKey) -> Path:
    """Where a row lives under a tier root (two-level fan-out keeps directories small)."""
    name = file_name(key)
    return root / name[:2] / name
