"""llama.cpp's log callback: pieces joined per line, levels mapped, warnings kept for the next exception."""

from __future__ import annotations

import logging

import pytest

from erllama._native import errcheck, loader

pytestmark = pytest.mark.native


def _log(level: int, text: str) -> None:
    loader._on_log(level, loader.ffi.new("char[]", text.encode()), loader.ffi.NULL)


def test_pieces_are_joined_and_keep_their_level(native: None, caplog: pytest.LogCaptureFixture) -> None:
    errcheck.clear_last_error()
    with caplog.at_level(logging.DEBUG, logger="erllama.llama"):
        _log(3, "first half, ")
        _log(5, "second half\n")
        _log(2, "an info line\n")
        _log(4, "unterminated error")
        _log(2, "next line flushes the previous one\n")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "erllama.llama"]
    assert records == [
        (logging.WARNING, "first half, second half"),
        (logging.INFO, "an info line"),
        (logging.ERROR, "unterminated error"),
        (logging.INFO, "next line flushes the previous one"),
    ]
    assert errcheck.last_error("none") == "first half, second half; unterminated error"
    errcheck.clear_last_error()
    assert errcheck.last_error("none") == "none"
