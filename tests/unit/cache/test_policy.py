"""Save-policy gates: pure decisions with a reason for every veto."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erllama.cache.policy import SavePolicy, Veto, allows_continued_save, allows_final_save, cold_save_point
from erllama.errors import InvalidInputError


def test_defaults_cache_a_chat_of_a_few_hundred_tokens() -> None:
    policy = SavePolicy()
    point = cold_save_point(policy, 300)
    assert isinstance(point, int)
    assert 256 <= point < 300
    assert allows_final_save(policy, 300) is None
    assert cold_save_point(policy, 20) is Veto.TOO_SHORT


@given(st.integers(min_value=0, max_value=100_000), st.integers(0, 64), st.integers(1, 128))
def test_cold_point_is_aligned_inside_the_prompt(n_prompt: int, trim: int, align: int) -> None:
    policy = SavePolicy(min_tokens=1, cold_min_tokens=1, boundary_trim_tokens=trim, boundary_align_tokens=align)
    point = cold_save_point(policy, n_prompt)
    if isinstance(point, int):
        assert point % align == 0
        assert 1 <= point <= n_prompt - 1 - trim, "the last prompt token is always recomputed"
    else:
        assert point is Veto.TOO_SHORT
        assert n_prompt - 1 - trim < align


def test_cold_bounds() -> None:
    policy = SavePolicy(min_tokens=8, cold_min_tokens=100, cold_max_tokens=1000, boundary_align_tokens=1)
    assert cold_save_point(policy, 50) is Veto.COLD_TOO_SHORT
    assert cold_save_point(policy, 5000) is Veto.COLD_TOO_LONG
    assert cold_save_point(policy, 501) == 500


def test_continued_and_final_gates() -> None:
    policy = SavePolicy(continued_interval=100, min_tokens=10)
    assert allows_continued_save(policy, 500, 99) is Veto.NOT_DUE
    assert allows_continued_save(policy, 500, 100) is None
    assert allows_continued_save(policy, 5, 200) is Veto.TOO_SHORT
    assert allows_continued_save(SavePolicy(continued_interval=0), 500, 10_000) is Veto.DISABLED
    assert allows_final_save(policy, 9) is Veto.TOO_SHORT
    assert allows_final_save(policy, 50, already_cached=True) is Veto.ALREADY_CACHED


def test_bad_knobs() -> None:
    with pytest.raises(InvalidInputError):
        SavePolicy(min_tokens=-1)
    with pytest.raises(InvalidInputError):
        SavePolicy(boundary_align_tokens=0)
    with pytest.raises(InvalidInputError):
        SavePolicy(cold_min_tokens=10, cold_max_tokens=5)
