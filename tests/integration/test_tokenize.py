"""Tokenisation round trips and UTF-8-safe streaming, on the tiny SPM model and SmolLM2's BPE vocabulary."""

from __future__ import annotations

import pytest

from erllama._native import Model
from erllama.text import Detokenizer

pytestmark = pytest.mark.native

TEXTS = [
    "Hello world",
    "the quick brown fox jumps over the lazy dog",
    "emoji: 🎉🦙👩‍👩‍👧‍👦 done",
    "CJK: 世界你好, 日本語のテキスト, 한국어",
    "byte fallback for rare characters: ǅ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u2028 tab\tnew\nline",
    "  leading and trailing spaces  ",
    "",
]


def _strip_prefix_space(model: Model, text: str, rendered: str) -> str:
    # An SPM vocabulary with add_space_prefix renders the word-initial "▁" it added as a space.
    if model.info.vocab_type == 1 and rendered.startswith(" "):
        return rendered[1:]
    return rendered


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(model: Model, text: str) -> None:
    tokens = model.tokenize(text, add_special=False)
    assert all(0 <= t < model.n_vocab for t in tokens)
    assert model.detokenize(tokens) == text or _strip_prefix_space(model, text, model.detokenize(tokens)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_are_whole_characters_and_add_up(model: Model, text: str) -> None:
    tokens = model.tokenize(text, add_special=False)
    detok = Detokenizer(model)
    pieces = [detok.feed(t) for t in tokens]
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")
    streamed = "".join(pieces) + detok.flush()
    assert streamed == b"".join(model.token_to_piece(t) for t in tokens).decode("utf-8")
    # llama_detokenize drops the space an SPM vocabulary prefixed to the first word; a stream keeps it, since a
    # continuation's first piece (" Paris" after "The capital is") really starts with one.
    assert _strip_prefix_space(model, text, streamed) == text


def test_multibyte_characters_really_are_split_across_tokens(model: Model) -> None:
    """The streaming test above only proves something if some token ends mid-character."""
    tokens = model.tokenize("🎉🦙 世界 𝔘𝔫𝔦", add_special=False)
    pieces = [model.token_to_piece(t) for t in tokens]
    assert any(_incomplete(p) for p in pieces)
    detok = Detokenizer(model)
    held = [detok.feed(t) == "" for t in tokens]
    assert any(held)


def _incomplete(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_special_tokens_are_explicit(model: Model) -> None:
    text = "<|im_start|>user"
    as_text = model.tokenize(text, add_special=False, parse_special=False)
    as_special = model.tokenize(text, add_special=False, parse_special=True)
    im_start = as_special[0]
    assert model.token_text(im_start) == "<|im_start|>"
    assert im_start not in as_text
    assert len(as_special) < len(as_text)
    rendered = model.detokenize(as_special, unparse_special=True)
    assert rendered.startswith("<|im_start|>")
    assert rendered.endswith("user")  # SPM may put its word-prefix space after the special token
    assert "<|im_start|>" not in model.detokenize(as_special, unparse_special=False)


def test_bos_follows_the_model_metadata(model: Model) -> None:
    with_special = model.tokenize("hello", add_special=True)
    without = model.tokenize("hello", add_special=False)
    if model.info.add_bos:
        assert with_special == [model.info.bos, *without]
    else:
        assert with_special == without


def test_chat_template_renders_with_llama_cpp(model: Model) -> None:
    text = model.apply_chat_template([("system", "Be brief."), ("user", "Hi 🦙")])
    assert "<|im_start|>user\nHi 🦙<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
