"""A RuleBasedStateMachine of a tier's budget, LRU and pins, checked against a plain dict model."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from erllama.cache.counters import Counters
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.cache.kvc import RowMeta, SaveReason
from erllama.cache.tier import RamTier

NS = Namespace("7" * 64, "F16", ctx_params_hash({"n_ctx": 256}))
BUDGET = 1000
KEYS = st.integers(min_value=0, max_value=9)


def meta(i: int) -> RowMeta:
    return RowMeta(cache_key(NS, [i]), NS, (i,), SaveReason.MANUAL, created_ns=0)


class TierMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.counters = Counters()
        self.tier = RamTier(BUDGET, self.counters)
        self.dropped: list[bytes] = []
        self.tier.on_drop = lambda key: self.dropped.append(bytes(key))
        self.model: OrderedDict[int, int] = OrderedDict()  # LRU first
        self.pins: dict[int, int] = {}

    def _model_publish(self, i: int, size: int) -> bool:
        if size > BUDGET:
            return False
        used = sum(self.model.values())
        order = [k for k in self.model if not self.pins.get(k) and k != i]
        evicted = []
        while used + size > BUDGET:
            if not order:
                return False
            victim = order.pop(0)
            used -= self.model[victim]
            evicted.append(victim)
        for v in evicted:
            del self.model[v]
        self.model.pop(i, None)
        self.model[i] = size
        return True

    @rule(i=KEYS, size=st.integers(min_value=0, max_value=1200))
    def publish(self, i: int, size: int) -> None:
        before = set(self.model)
        expected = self._model_publish(i, size)
        assert self.tier.publish(meta(i), bytes(size)) == expected
        gone = before - set(self.model)
        assert {bytes(meta(k).key) for k in gone} <= set(self.dropped)

    @rule(i=KEYS)
    def load(self, i: int) -> None:
        row = self.tier.load(meta(i).key)
        assert (row is not None) == (i in self.model)
        if row is not None:
            assert len(row[1]) == self.model[i]
            self.model.move_to_end(i)

    @rule(i=KEYS)
    def pin(self, i: int) -> None:
        if self.tier._b.touch_and_pin(meta(i).key):
            assert i in self.model
            self.model.move_to_end(i)
            self.pins[i] = self.pins.get(i, 0) + 1
        else:
            assert i not in self.model

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(k for k, v in self.pins.items() if v)))
        self.tier._b.unpin(meta(i).key)
        self.pins[i] -= 1

    @rule(n=st.integers(min_value=1, max_value=1500))
    def evict(self, n: int) -> None:
        freed_model = 0
        for k in [k for k in self.model if not self.pins.get(k)]:
            if freed_model >= n:
                break
            freed_model += self.model.pop(k)
        assert self.tier.evict(n) == freed_model

    @rule(i=KEYS)
    def remove(self, i: int) -> None:
        assert self.tier.remove(meta(i).key) == (i in self.model)
        self.model.pop(i, None)

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert self.tier.used_bytes == sum(self.model.values()) <= BUDGET
        assert len(self.tier) == len(self.model)
        assert list(self.tier._b.sizes) == [meta(k).key for k in self.model]
        assert self.counters.snapshot().get("ram_bytes", 0) == self.tier.used_bytes


TestTierMachine = TierMachine.TestCase
