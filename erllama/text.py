"""``Detokenizer``: token pieces to text for streaming, never emitting a broken UTF-8 sequence.

A byte-fallback vocabulary spells an emoji or a CJK character as several tokens of one byte each, and BPE merges
can split a character across tokens too. The incremental UTF-8 decoder from ``codecs`` holds back an incomplete
sequence until its last byte arrives, so every string handed out is whole characters only; bytes that can never
become valid UTF-8 come out as U+FFFD rather than being dropped or passed through broken. Pure Python: it reads
pieces through ``PieceSource`` (a native Model, the stub backend), so it imports without the native build.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Protocol

from erllama.errors import InvalidInputError

__all__ = ["Detokenizer", "PieceSource", "utf8"]


def utf8(text: str, what: str = "text") -> bytes:
    """``text`` as UTF-8 for a C call; InvalidInputError for text that has none (a lone surrogate such as the
    JSON escape ``"\\ud800"``), naming where."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid Unicode: {exc.reason} at character {exc.start} ({exc.object[exc.start]!r})"
        ) from None


class PieceSource(Protocol):
    """Anything that renders a token id to its bytes (a Model, or a test double)."""

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes: ...


class Detokenizer:
    """Feeds tokens, returns the text that became complete.

    Args:
        model: whose vocabulary renders the tokens.
        special: render control tokens (``<|im_end|>``...) as their text instead of nothing.
    """

    def __init__(self, model: PieceSource, *, special: bool = False) -> None:
        self._model = model
        self._special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        """Add one token; returns the newly completed text (possibly empty)."""
        return self._decoder.decode(self._model.token_to_piece(token, special=self._special))

    def feed_many(self, tokens: Iterable[int]) -> str:
        return "".join(self.feed(t) for t in tokens)

    @property
    def pending_bytes(self) -> int:
        """Bytes held back because they do not yet form a complete character."""
        buffered, _ = self._decoder.getstate()
        return len(buffered)

    def flush(self) -> str:
        """End of stream: whatever is still held back, as U+FFFD if it never completed."""
        return self._decoder.decode(b"", final=True)

    def reset(self) -> None:
        self._decoder.reset()
