"""Model fingerprints in the three modes of the reference: safe, gguf_chunked, fast_unsafe."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest

from erllama.cache.key import FingerprintMode, fingerprint
from erllama.errors import InvalidInputError
from erllama.testing import TinyModelSpec, write_tiny_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("fp") / "tiny.gguf")


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def _tensor_offsets(path: Path) -> tuple[int, int]:
    tensors = sorted(gguf.GGUFReader(path).tensors, key=lambda t: int(t.data_offset))
    return int(tensors[0].data_offset), int(tensors[-1].data_offset)


def test_modes_are_stable_and_distinct(model_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(model_file, copy)
    for mode in (FingerprintMode.SAFE, FingerprintMode.GGUF_CHUNKED):
        assert fingerprint(model_file, mode) == fingerprint(copy, mode)
    assert fingerprint(model_file, FingerprintMode.SAFE) != fingerprint(model_file, FingerprintMode.GGUF_CHUNKED)


def test_what_each_mode_notices(model_file: Path, tmp_path: Path) -> None:
    first, last = _tensor_offsets(model_file)
    base = {m: fingerprint(model_file, m) for m in (FingerprintMode.SAFE, FingerprintMode.GGUF_CHUNKED)}

    in_first = tmp_path / "first.gguf"
    shutil.copyfile(model_file, in_first)
    _flip_byte(in_first, first + 1)
    assert fingerprint(in_first, FingerprintMode.GGUF_CHUNKED) != base[FingerprintMode.GGUF_CHUNKED]
    assert fingerprint(in_first, FingerprintMode.SAFE) != base[FingerprintMode.SAFE]

    # gguf_chunked trades completeness for speed: a change deep in a later tensor is only seen by safe.
    in_last = tmp_path / "last.gguf"
    shutil.copyfile(model_file, in_last)
    _flip_byte(in_last, last + 1)
    assert fingerprint(in_last, FingerprintMode.GGUF_CHUNKED) == base[FingerprintMode.GGUF_CHUNKED]
    assert fingerprint(in_last, FingerprintMode.SAFE) != base[FingerprintMode.SAFE]

    other = write_tiny_model(tmp_path / "other.gguf", TinyModelSpec(seed=99))
    assert fingerprint(other, FingerprintMode.GGUF_CHUNKED) != base[FingerprintMode.GGUF_CHUNKED]


def test_fast_unsafe_takes_the_callers_word(model_file: Path) -> None:
    assert fingerprint(model_file, FingerprintMode.FAST_UNSAFE, supplied="my-model-v1") == "my-model-v1"
    with pytest.raises(InvalidInputError):
        fingerprint(model_file, FingerprintMode.FAST_UNSAFE)


def test_fingerprints_are_memoised_until_the_file_changes(model_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m.gguf"
    shutil.copyfile(model_file, copy)
    memo = tmp_path / "memo.json"
    first = fingerprint(copy, FingerprintMode.SAFE, memo=memo)
    assert memo.is_file()
    assert fingerprint(copy, FingerprintMode.SAFE, memo=memo) == first
    _flip_byte(copy, copy.stat().st_size - 1)  # changes content and mtime
    assert fingerprint(copy, FingerprintMode.SAFE, memo=memo) != first


def test_memo_forgets_files_that_are_gone(model_file: Path, tmp_path: Path) -> None:
    import json

    memo = tmp_path / "memo.json"
    gone = tmp_path / "gone.gguf"
    shutil.copyfile(model_file, gone)
    fingerprint(gone, FingerprintMode.SAFE, memo=memo)
    gone.unlink()
    fingerprint(model_file, FingerprintMode.SAFE, memo=memo)
    entries = json.loads(memo.read_text())
    assert len(entries) == 1
    assert str(model_file.resolve()) in next(iter(entries))
