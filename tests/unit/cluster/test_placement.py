"""The router's decision, without Ray: token-exact prefix placement, the cost of load, the load guard, pins,
parent rows, and what the router remembers of its own choices."""

from __future__ import annotations

import random

import numpy as np

from erllama.cache.index import PrefixIndex, RouteSummary
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.cluster.placement import Candidate, Placement, PlacementConfig, Route

NS = Namespace("12" * 32, "Q4_1", ctx_params_hash({"n_ctx": 4096}))
ROOT = NS.digest()
SYSTEM = list(range(5000, 5512))  # 32 blocks


def _route(tokens: list[int], **kw: object) -> Route:
    return Route(tokens=np.asarray(tokens, dtype="<i4").tobytes(), **kw)  # type: ignore[arg-type]


def _summary(*rows: list[int]) -> RouteSummary:
    index = PrefixIndex()
    for row in rows:
        index.add(NS, row)
    summary = index.summary()
    return RouteSummary(summary.roots | {ROOT}, summary.links, summary.keys, summary.n_rows)


EMPTY = RouteSummary(frozenset({ROOT}))


def _cands(*specs: tuple[str, RouteSummary, int]) -> list[Candidate[str]]:
    return [Candidate(id=name, name=name, summary=s, in_flight=n) for name, s, n in specs]


def test_the_replica_holding_the_longest_prefix_comes_first() -> None:
    p: Placement[str] = Placement()
    a = _summary(SYSTEM[:160])
    b = _summary(SYSTEM[:320])
    ranks = p.rank(_route([*SYSTEM, 1, 2, 3]), _cands(("a", a, 0), ("b", b, 0), ("c", EMPTY, 0)))
    assert ranks == [["b"], ["a"], ["c"]]


def test_a_busy_holder_loses_to_an_idle_replica_once_its_queue_costs_more_than_the_prefill() -> None:
    p: Placement[str] = Placement(PlacementConfig(tokens_per_request=256, imbalance=100))
    held = _summary(SYSTEM)
    prompt = [*SYSTEM, *range(64)]  # 576 tokens, 512 of them held by "a"
    assert p.rank(_route(prompt), _cands(("a", held, 1), ("b", EMPTY, 0)))[0] == ["a"]  # 64 + 256 < 576
    assert p.rank(_route(prompt), _cands(("a", held, 2), ("b", EMPTY, 0)))[0] == ["b"]  # 64 + 512 >= 576


def test_the_load_guard_falls_back_to_two_random_choices() -> None:
    p: Placement[str] = Placement(PlacementConfig(tokens_per_request=0, imbalance=4), rng=random.Random(1))
    held = _summary(SYSTEM)
    cands = _cands(("a", held, 4), ("b", EMPTY, 0), ("c", EMPTY, 0))
    ranks = p.rank(_route(SYSTEM), cands)
    assert len(ranks) == 1
    assert len(ranks[0]) == 2, "one rank of two: Ray takes the shorter queue"
    cands = _cands(("a", held, 3), ("b", EMPTY, 0), ("c", EMPTY, 0))
    assert p.rank(_route(SYSTEM), cands)[0] == ["a"], "under the guard: the prefix wins"


def test_a_request_without_tokens_gets_two_random_choices() -> None:
    p: Placement[str] = Placement(rng=random.Random(0))
    seen = set()
    for _ in range(50):
        (rank,) = p.rank(Route(), _cands(("a", EMPTY, 0), ("b", EMPTY, 0), ("c", EMPTY, 0)))
        assert len(rank) == 2
        seen.update(rank)
    assert seen == {"a", "b", "c"}


def test_a_pin_names_the_replica() -> None:
    p: Placement[str] = Placement()
    cands = _cands(("a", _summary(SYSTEM), 0), ("b", EMPTY, 9))
    assert p.rank(_route(SYSTEM, pin="b"), cands) == [["b"]]
    assert p.rank(_route(SYSTEM, pin="gone"), cands)[0] == ["a"], "a pin to no candidate is ignored"


def test_a_parent_key_goes_where_its_row_is() -> None:
    p: Placement[str] = Placement()
    parent = cache_key(NS, SYSTEM[:100])
    cands = _cands(("a", _summary(SYSTEM), 0), ("b", _summary(SYSTEM[:100]), 3))
    assert p.rank(_route(SYSTEM, parent_key=parent), cands)[0] == ["b"]


def test_what_was_sent_counts_as_cached_until_a_report_says_so() -> None:
    p: Placement[str] = Placement(PlacementConfig(tokens_per_request=0))
    turn1 = [*SYSTEM, *range(100)]
    turn2 = [*turn1, *range(200, 300)]
    cands = _cands(("a", EMPTY, 0), ("b", EMPTY, 0))
    first = p.rank(_route(turn1), cands)[0][:1]  # nobody holds it: two choices; say Ray took the first
    p.sent("r1", _route(turn1), next(c for c in cands if c.id == first[0]))
    _, held = p.costs(_route(turn2), cands)
    assert held == {"a": 0, "b": 0}, "while the first turn runs, its prompt is not held anywhere yet"
    p.ended("r1")
    assert p.rank(_route(turn2), cands)[0] == first, "the next turn follows the first before any report"
    p.forget(first[0][0])
    costs, held = p.costs(_route(turn2), cands)
    assert costs["a"] == costs["b"] == len(turn2), "a dead replica's history is gone"
    assert held == {"a": 0, "b": 0}


def test_every_replica_costs_the_whole_prompt_when_none_holds_it() -> None:
    p: Placement[str] = Placement(PlacementConfig(tokens_per_request=100))
    costs, _ = p.costs(_route(SYSTEM), _cands(("a", EMPTY, 0), ("b", EMPTY, 2)))
    assert costs == {"a": 512, "b": 712}


def test_a_prompt_nobody_holds_is_placed_by_load_alone() -> None:
    p: Placement[str] = Placement(rng=random.Random(3))
    (rank,) = p.rank(_route(SYSTEM), _cands(("a", EMPTY, 0), ("b", EMPTY, 0), ("c", EMPTY, 0)))
    assert len(rank) == 2


def test_equal_costs_are_broken_at_random() -> None:
    p: Placement[str] = Placement(rng=random.Random(5))
    held = _summary(SYSTEM)
    firsts = {p.rank(_route(SYSTEM), _cands(("a", held, 0), ("b", held, 0)))[0][0] for _ in range(40)}
    assert firsts == {"a", "b"}


def test_equal_costs_go_where_the_conversation_ran() -> None:
    """Behind a shared disk tier both replicas report the conversation's rows; the one that ran it keeps it."""
    turn1 = [*SYSTEM, *range(100)]
    turn2 = [*turn1, *range(200, 300)]
    both = _summary(turn1)
    for seed in range(20):
        p: Placement[str] = Placement(rng=random.Random(seed))
        cands = _cands(("a", both, 0), ("b", both, 0))
        p.sent("r1", _route(turn1), cands[1])
        p.ended("r1")
        assert p.rank(_route(turn2), cands)[0] == ["b"]


def test_the_backlog_of_prefills_sent_counts_until_they_end() -> None:
    p: Placement[str] = Placement(PlacementConfig(tokens_per_request=0))
    held = _summary(SYSTEM)
    a, b = _cands(("a", held, 0), ("b", EMPTY, 0))
    other = list(range(9000, 10000))  # 1,000 tokens nobody holds
    p.sent("cold", _route(other), a)  # a must compute all of it
    assert p.backlog("a") == 1000
    prompt = [*SYSTEM, *range(64)]  # a holds 512 of its 576 tokens, but is busy with a 1,000-token prefill
    assert p.rank(_route(prompt), [a, b])[0] == ["b"], "64 + 1,000 queued on a costs more than 576 on b"
    p.sent("hit", _route(prompt), a)
    assert p.backlog("a") == 1064, "a held the rest: only 64 more"
    p.ended("cold")
    assert p.backlog("a") == 64
    assert p.rank(_route(prompt), [a, b])[0] == ["a"]
    p.ended("hit")
    p.ended("hit")  # twice, or never sent: nothing happens
    assert p.backlog("a") == 0
    p.sent("x", _route(other), b)
    p.forget("b")
    assert p.backlog("b") == 0
