"""Keys are equal exactly when namespace and token lists are equal; the block chain gives every prefix's key."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from erllama.cache.key import BLOCK_TOKENS, Namespace, cache_key, ctx_params_hash, prefix_keys

TOKENS = st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=5 * BLOCK_TOKENS + 3)
SMALL_TOKENS = st.lists(st.integers(min_value=0, max_value=3), max_size=3 * BLOCK_TOKENS + 2)
NAMESPACES = st.builds(
    Namespace,
    model_fingerprint=st.sampled_from(["a" * 64, "b" * 64]),
    quantization=st.sampled_from(["Q4_1", "F16"]),
    ctx_params=st.sampled_from([ctx_params_hash({"n_ctx": 4096}), ctx_params_hash({"n_ctx": 8192})]),
    adapters=st.sampled_from([(), (("c" * 64, 1.0),), (("c" * 64, 0.5),)]),
    salt=st.sampled_from(["", "tenant-1"]),
)


@given(NAMESPACES, NAMESPACES, SMALL_TOKENS, SMALL_TOKENS)
def test_keys_equal_exactly_when_inputs_equal(ns_a: Namespace, ns_b: Namespace, a: list[int], b: list[int]) -> None:
    same = ns_a == ns_b and a == b
    assert (cache_key(ns_a, a) == cache_key(ns_b, b)) == same


@given(NAMESPACES, TOKENS)
def test_key_depends_on_every_token(ns: Namespace, tokens: list[int]) -> None:
    assume(tokens)
    base = cache_key(ns, tokens)
    for i in {0, len(tokens) // 2, len(tokens) - 1}:
        changed = list(tokens)
        changed[i] = (changed[i] + 1) % 2**31
        assert cache_key(ns, changed) != base
    assert cache_key(ns, tokens[:-1]) != base
    assert cache_key(ns, [*tokens, 0]) != base


@given(NAMESPACES, TOKENS, st.data())
def test_prefix_keys_match_direct_keys(ns: Namespace, tokens: list[int], data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(min_value=0, max_value=len(tokens)), max_size=6))
    keys = prefix_keys(ns, tokens, lengths)
    assert set(keys) == set(lengths)
    for n, key in keys.items():
        assert key == cache_key(ns, tokens[:n])


def test_namespace_round_trips_through_its_parts() -> None:
    ns = Namespace("f" * 64, "Q4_K_M", ctx_params_hash({"n_ctx": 1, "type_k": "f16"}), (("a" * 64, 0.25),), "s")
    assert Namespace.from_parts(ns.parts()) == ns
    assert Namespace.from_parts(ns.parts()).digest() == ns.digest()


def test_ctx_params_hash_is_order_independent_and_value_sensitive() -> None:
    assert ctx_params_hash({"a": 1, "b": 2}) == ctx_params_hash({"b": 2, "a": 1})
    assert ctx_params_hash({"a": 1, "b": 2}) != ctx_params_hash({"a": 1, "b": 3})
