"""Streaming stop-sequence matching gives the same answer as searching the whole text, for any split."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from erllama.model.stop import StopMatcher, first_stop

ALPHABET = st.sampled_from(list("ab🎉世\n"))
STOPS = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3)


@given(st.text(alphabet=ALPHABET, max_size=40), STOPS, st.lists(st.integers(0, 40), max_size=12))
def test_streaming_equals_whole_text_search(text: str, stops: list[str], cuts: list[int]) -> None:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    matcher = StopMatcher(stops)
    shown = "".join(matcher.feed(p) for p in pieces) + matcher.flush()
    expected = first_stop(text, stops)
    if expected is None:
        assert shown == text
        assert matcher.matched is None
    else:
        assert shown == text[: expected[0]]
        assert matcher.matched == expected[1]


def test_holds_back_only_what_could_still_match() -> None:
    m = StopMatcher(["</s>", "\n\n"])
    assert m.feed("Hello <") == "Hello "
    assert m.feed("b>") == "<b>"
    assert m.feed(" world\n") == " world"
    assert m.feed("\nignored") == ""
    assert m.matched == "\n\n"
    assert m.feed("more") == ""
    assert m.flush() == ""


def test_an_earlier_longer_stop_beats_a_later_shorter_one() -> None:
    m = StopMatcher(["abcd", "c"])
    assert m.feed("xab") == "x"
    assert m.feed("c") == ""  # "c" is complete, but "abcd" could still match earlier
    assert m.feed("d!") == ""
    assert m.matched == "abcd"
