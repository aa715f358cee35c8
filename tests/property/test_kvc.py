"""KVC v2 files: round trips with and without zstd, unknown tags skipped, every truncation and bit flip rejected."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama.cache import kvc
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.errors import CorruptCacheFileError

NS = Namespace("ab" * 32, "Q4_1", ctx_params_hash({"n_ctx": 4096, "type_k": "f16"}))


def _meta(tokens: list[int], reason: kvc.SaveReason = kvc.SaveReason.COLD) -> kvc.RowMeta:
    return kvc.RowMeta(
        key=cache_key(NS, tokens),
        namespace=NS,
        tokens=tuple(tokens),
        save_reason=reason,
        created_ns=1_700_000_000_000_000_000,
        last_used_ns=5,
        hit_count=3,
        producer="erllama test",
    )


ROWS = st.tuples(
    st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=200),
    st.binary(max_size=4096),
    st.sampled_from([None, 1, 3]),
    st.sampled_from(list(kvc.SaveReason)),
)


def _file(tokens: list[int], payload: bytes, level: int | None, reason: kvc.SaveReason) -> bytes:
    return b"".join(bytes(s) for s in kvc.encode(_meta(tokens, reason), payload, compress_level=level))


@given(ROWS)
def test_round_trip(row: tuple[list[int], bytes, int | None, kvc.SaveReason]) -> None:
    tokens, payload, level, reason = row
    meta, state = kvc.decode(_file(tokens, payload, level, reason))
    assert meta == _meta(tokens, reason)
    assert bytes(state) == payload


def test_zstd_really_compresses_and_raw_passes_through_without_copy() -> None:
    payload = bytes(64 * 1024)
    raw = kvc.encode(_meta([1, 2]), memoryview(payload))
    assert raw[1].obj is payload  # type: ignore[union-attr]
    packed = kvc.encode(_meta([1, 2]), payload, compress_level=3)
    assert len(packed[1]) < len(payload) // 10


@settings(max_examples=25)
@given(ROWS)
def test_every_truncation_is_rejected(row: tuple[list[int], bytes, int | None, kvc.SaveReason]) -> None:
    data = _file(*row)
    for n in range(len(data)):
        with pytest.raises(CorruptCacheFileError):
            kvc.decode(data[:n])


@given(ROWS, st.data())
def test_every_bit_flip_is_rejected(
    row: tuple[list[int], bytes, int | None, kvc.SaveReason], data: st.DataObject
) -> None:
    blob = bytearray(_file(*row))
    bit = data.draw(st.integers(min_value=0, max_value=8 * len(blob) - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptCacheFileError):
        kvc.decode(blob)


def test_bit_flips_exhaustively_on_a_small_file() -> None:
    blob = _file([7, 8, 9], b"state bytes", None, kvc.SaveReason.FINISH)
    for bit in range(8 * len(blob)):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptCacheFileError):
            kvc.decode(flipped)


def _with_extra_tlv(blob: bytes, tag: int, value: bytes) -> bytes:
    """Append a TLV entry to a file's metadata and fix up the lengths and header checksum, as a newer writer would."""
    head = bytearray(blob[: kvc.HEADER_SIZE])
    magic, version, flags, tlv_len, payload_len, raw_len, _ = struct.unpack("<4sHHIQQQ", head)
    tlv = blob[kvc.HEADER_SIZE : kvc.HEADER_SIZE + tlv_len] + struct.pack("<HI", tag, len(value)) + value
    rest = blob[kvc.HEADER_SIZE + tlv_len :]
    fixed = struct.pack("<4sHHIQQ", magic, version, flags, len(tlv), payload_len, raw_len)
    digest = xxhash.xxh3_64_intdigest(fixed + tlv)
    return fixed + struct.pack("<Q", digest) + tlv + rest


@given(st.integers(min_value=100, max_value=65535), st.binary(max_size=64))
def test_unknown_tags_are_skipped(tag: int, value: bytes) -> None:
    blob = _file([1, 2, 3], b"payload", None, kvc.SaveReason.COLD)
    meta, state = kvc.decode(_with_extra_tlv(blob, tag, value))
    assert meta == _meta([1, 2, 3])
    assert bytes(state) == b"payload"


def test_errors_say_what_is_wrong() -> None:
    blob = _file([1, 2, 3], b"payload", None, kvc.SaveReason.COLD)
    cases = {
        "truncated header": blob[:10],
        "not a KVC file": b"GGUF" + blob[4:],
        "unsupported KVC version": blob[:4] + struct.pack("<H", 3) + blob[6:],
        "truncated payload": blob[:-3],
        "unexpected bytes after the trailer": blob + b"x",
        "payload checksum mismatch": blob[:-9] + bytes([blob[-9] ^ 1]) + blob[-8:],
        "appears twice": _with_extra_tlv(blob, kvc.Tag.HIT_COUNT, struct.pack("<Q", 1)),
    }
    for reason, data in cases.items():
        with pytest.raises(CorruptCacheFileError, match=reason):
            kvc.decode(data)


def test_files_on_disk(tmp_path: Path) -> None:
    meta = _meta(list(range(100)))
    path = kvc.path_for(tmp_path, meta.key)
    path.parent.mkdir(parents=True)
    with path.open("wb") as fh:
        kvc.write_segments(fh, kvc.encode(meta, b"S" * 10_000, compress_level=3))
    got, size = kvc.read_meta(path)
    assert got == meta
    assert size == path.stat().st_size
    meta2, state = kvc.read_row(path)
    assert (meta2, bytes(state)) == (meta, b"S" * 10_000)
    with pytest.raises(CorruptCacheFileError, match="exceeds"):
        kvc.read_row(path, max_bytes=100)
    assert path.name == bytes(meta.key).hex() + ".kvc"
