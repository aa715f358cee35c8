"""The prefix index returns the same longest stored prefix as a brute-force search, through adds and removes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from erllama.cache.index import PrefixIndex
from erllama.cache.key import BLOCK_TOKENS, Namespace, cache_key, ctx_params_hash

NS = [Namespace(f"{i}" * 64, "F16", ctx_params_hash({"n_ctx": 512})) for i in (1, 2)]
# A tiny alphabet and a shared stem make rows share prefixes and blocks, which is where an index can go wrong.
STEM = [5, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5, 0]
TOKENS = st.builds(
    lambda n, tail: STEM[:n] + tail,
    st.integers(min_value=0, max_value=len(STEM)),
    st.lists(st.integers(min_value=0, max_value=2), max_size=2 * BLOCK_TOKENS + 3),
)


def brute_force(
    rows: dict[tuple[int, tuple[int, ...]], bool], ns: int, prompt: list[int], lo: int, hi: int
) -> int | None:
    best = None
    for row_ns, row in rows:
        n = len(row)
        if row_ns == ns and lo <= n <= hi and list(row) == prompt[:n] and (best is None or n > best):
            best = n
    return best


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 1), TOKENS), max_size=25),
    st.integers(0, 1),
    TOKENS,
    st.integers(min_value=0, max_value=3),
)
def test_matches_brute_force(rows: list[tuple[int, list[int]]], ns: int, prompt: list[int], shave: int) -> None:
    index = PrefixIndex()
    stored: dict[tuple[int, tuple[int, ...]], bool] = {}
    for row_ns, tokens in rows:
        if tokens:
            index.add(NS[row_ns], tokens)
            stored[(row_ns, tuple(tokens))] = True
    max_tokens = max(0, len(prompt) - shave)
    hit = index.longest_prefix(NS[ns], prompt, max_tokens=max_tokens)
    expected = brute_force(stored, ns, prompt, 1, max_tokens)
    assert (hit.n_tokens if hit else None) == expected
    if hit is not None:
        assert hit.key == cache_key(NS[ns], prompt[: hit.n_tokens])


class IndexMachine(RuleBasedStateMachine):
    """Random adds, removes and lookups against a plain dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.index = PrefixIndex()
        self.model: dict[bytes, tuple[int, tuple[int, ...]]] = {}

    keys = Bundle("keys")

    @rule(target=keys, ns=st.integers(0, 1), tokens=TOKENS.filter(bool))
    def add(self, ns: int, tokens: list[int]) -> bytes:
        key = self.index.add(NS[ns], tokens)
        assert key == cache_key(NS[ns], tokens)
        self.model[key] = (ns, tuple(tokens))
        return key

    @rule(key=keys)
    def remove(self, key: bytes) -> None:
        assert self.index.remove(key) == (key in self.model)  # type: ignore[arg-type]
        self.model.pop(key, None)

    @rule(ns=st.integers(0, 1), prompt=TOKENS)
    def lookup(self, ns: int, prompt: list[int]) -> None:
        hit = self.index.longest_prefix(NS[ns], prompt)
        stored = dict.fromkeys(self.model.values(), True)
        assert (hit.n_tokens if hit else None) == brute_force(stored, ns, prompt, 1, len(prompt))

    @invariant()
    def sizes_agree(self) -> None:
        assert len(self.index) == len(self.model)


TestIndexMachine = IndexMachine.TestCase


def test_empty_index_and_internal_tables_drain() -> None:
    index = PrefixIndex()
    assert index.longest_prefix(NS[0], [1, 2, 3]) is None
    keys = [index.add(NS[0], STEM[:n]) for n in (1, 16, 17, 33)]
    assert index.longest_prefix(NS[0], STEM).n_tokens == 33  # type: ignore[union-attr]
    assert index.longest_prefix(NS[0], STEM, max_tokens=32).n_tokens == 17  # type: ignore[union-attr]
    assert index.longest_prefix(NS[1], STEM) is None
    for key in keys:
        assert index.remove(key)
    assert not index.remove(keys[0])
    assert len(index) == 0
    assert not index._through
    assert not index._anchors


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 1), TOKENS), max_size=25), st.integers(0, 1), TOKENS, st.integers(0, 40))
def test_deepest_shared_matches_brute_force(
    rows: list[tuple[int, list[int]]], ns: int, prompt: list[int], limit: int
) -> None:
    index = PrefixIndex()
    stored: dict[bytes, tuple[int, list[int]]] = {}
    for row_ns, toks in rows:
        stored[index.add(NS[row_ns], toks)] = (row_ns, toks)

    def common(row: list[int]) -> int:
        n = 0
        while n < min(len(row), len(prompt)) and row[n] == prompt[n]:
            n += 1
        return n

    # rows sharing at least one whole block within the limit; the answer is their longest common prefix, capped
    eligible = [min(common(t), limit) for r_ns, t in stored.values() if r_ns == ns]
    eligible = [n for n in eligible if n >= BLOCK_TOKENS]
    hit = index.deepest_shared(NS[ns], prompt, max_tokens=limit)
    if not eligible:
        assert hit is None
    else:
        assert hit is not None
        assert hit.n_tokens == max(eligible)
        row_ns, toks = stored[hit.key]
        assert row_ns == ns
        assert toks[: hit.n_tokens] == prompt[: hit.n_tokens]
