"""The incremental detokenizer never hands out a broken character, whatever the token boundaries."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from erllama.text import Detokenizer


class BytePieces:
    """A vocabulary double: token i renders as pieces[i]."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        return self.pieces[token]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200) | st.sampled_from(
    ["🎉🦙", "世界你好", "naïve café", "👩‍👩‍👧‍👦 family", "\u0000", "a\U0010ffffb"]
)


@given(TEXT, st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_split_streams_whole_characters(text: str, cuts: list[int]) -> None:
    pieces = split(text.encode("utf-8"), cuts)
    detok = Detokenizer(BytePieces(pieces))
    out = [detok.feed(i) for i in range(len(pieces))]
    for piece in out:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # a str with a lone surrogate would raise here
    assert "".join(out) + detok.flush() == text
    assert detok.pending_bytes == 0


def test_emoji_byte_by_byte_is_held_back_until_complete() -> None:
    raw = "🦙".encode()
    detok = Detokenizer(BytePieces([bytes([b]) for b in raw]))
    assert [detok.feed(i) for i in range(3)] == ["", "", ""]
    assert detok.pending_bytes == 3
    assert detok.feed(3) == "🦙"


@given(st.binary(max_size=64))
def test_invalid_bytes_become_replacement_characters_not_broken_output(data: bytes) -> None:
    detok = Detokenizer(BytePieces([bytes([b]) for b in data]))
    text = "".join(detok.feed(i) for i in range(len(data))) + detok.flush()
    assert text == data.decode("utf-8", "replace")
