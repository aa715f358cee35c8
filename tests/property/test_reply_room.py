"""The reply length a request may reach (``sequences.reply_room``): never past the context, lowered only with
``fit_context``, refused only when nothing fits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from erllama.model.sequences import reply_room

sizes = st.integers(min_value=1, max_value=10_000)


@given(
    n_prompt=sizes, max_tokens=st.none() | st.integers(min_value=0, max_value=50_000), n_ctx=sizes, fit=st.booleans()
)
def test_the_reply_never_runs_past_the_context(n_prompt: int, max_tokens: int | None, n_ctx: int, fit: bool) -> None:
    got = reply_room(n_prompt, max_tokens, n_ctx, fit)
    room = n_ctx - n_prompt
    if got is None:  # refused only when nothing fits
        if max_tokens is None:
            assert room < 1  # not even one reply token
        elif fit:
            assert room < min(max_tokens, 1)  # a prompt-only request needs none, any other one
        else:
            assert n_prompt + max_tokens > n_ctx  # strict: the asked reply does not fit
        return
    assert n_prompt + got <= n_ctx
    if max_tokens is None:
        assert got == room  # no limit asked: all that is left
    elif fit:
        assert got == min(max_tokens, room)  # lowered, never raised
    else:
        assert got == max_tokens  # strict: as asked, or refused
