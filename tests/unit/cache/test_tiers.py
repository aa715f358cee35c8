"""Tiers: byte budgets enforced at publish time, LRU eviction, pins, crash leftovers and corrupt files."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from erllama.cache import kvc
from erllama.cache.counters import Counters
from erllama.cache.filetier import FileTier
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.cache.tier import RamTier, Tier

NS = Namespace("cd" * 32, "Q4_1", ctx_params_hash({"n_ctx": 2048}))


def meta(i: int, n: int = 40) -> kvc.RowMeta:
    tokens = tuple(range(i, i + n))
    return kvc.RowMeta(cache_key(NS, tokens), NS, tokens, kvc.SaveReason.FINISH, created_ns=i)


def make_ram(tmp_path: Path, budget: int, counters: Counters) -> Tier:
    return RamTier(budget, counters)


def make_disk(tmp_path: Path, budget: int, counters: Counters) -> Tier:
    return FileTier([tmp_path / "a", tmp_path / "b"], budget, counters, name="disk")


FACTORIES = [pytest.param(make_ram, id="ram"), pytest.param(make_disk, id="disk")]
Factory = Callable[[Path, int, Counters], Tier]


@pytest.mark.parametrize("factory", FACTORIES)
def test_round_trip_and_byte_accounting(factory: Factory, tmp_path: Path) -> None:
    counters = Counters()
    tier = factory(tmp_path, 1 << 20, counters)
    m = meta(1)
    assert tier.publish(m, b"x" * 1000)
    got = tier.load(m.key)
    assert got is not None
    assert got[0] == m
    assert bytes(got[1]) == b"x" * 1000
    assert len(tier) == 1
    assert tier.used_bytes >= 1000
    assert counters.snapshot()[f"{tier.name}_bytes"] == tier.used_bytes
    assert tier.remove(m.key)
    assert tier.load(m.key) is None
    assert tier.used_bytes == 0


@pytest.mark.parametrize("factory", FACTORIES)
def test_budget_is_enforced_with_lru_eviction(factory: Factory, tmp_path: Path) -> None:
    counters = Counters()
    probe = factory(tmp_path / "probe", 1 << 20, Counters())
    probe.publish(meta(0), b"y" * 1000)
    row_size = probe.used_bytes
    tier = factory(tmp_path / "t", 3 * row_size + row_size // 2, counters)
    for i in range(3):
        assert tier.publish(meta(i), b"y" * 1000)
    assert tier.load(meta(0).key) is not None  # row 0 is now the most recently used
    assert tier.publish(meta(3), b"y" * 1000)
    assert tier.used_bytes <= tier.budget_bytes
    assert meta(1).key not in tier, "the least recently used row goes first"
    assert meta(0).key in tier
    assert counters.snapshot()["evictions"] == 1
    assert not tier.publish(meta(9), b"z" * (tier.budget_bytes + 1))
    assert counters.snapshot()[f"{tier.name}_refused_too_large"] == 1
    assert tier.evict(1) >= 1
    assert len(tier) == 2


@pytest.mark.parametrize("factory", FACTORIES)
def test_concurrent_publishers_never_exceed_the_budget(factory: Factory, tmp_path: Path) -> None:
    tier = factory(tmp_path, 20_000, Counters())
    peak = [0]

    def work(base: int) -> None:
        for i in range(40):
            tier.publish(meta(base + i), os.urandom(900))
            peak[0] = max(peak[0], tier.used_bytes)
            tier.load(meta(base + i // 2).key)

    threads = [threading.Thread(target=work, args=(1000 * t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= tier.budget_bytes
    assert tier.used_bytes <= tier.budget_bytes
    for m in tier.metas():
        got = tier.load(m.key)
        assert got is not None


def test_file_tier_survives_restart_and_cleans_dead_writers(tmp_path: Path) -> None:
    counters = Counters()
    roots = [tmp_path / "r1", tmp_path / "r2"]
    tier = FileTier(roots, 1 << 20, counters)
    metas = [meta(i) for i in range(5)]
    for m in metas:
        assert tier.publish(m, bytes([m.tokens[0]]) * 500)
    assert {p.parent.parent for p in (tier.path_of(m.key) for m in metas) if p} == set(roots)
    # a writer that died mid-write (pid 2**22 + 1 is beyond pid_max on this machine) and a corrupt row
    dead = roots[0] / "tmp" / f"{'ab' * 32}.{2**22 + 1}.deadbeef.tmp"
    dead.write_bytes(b"partial")
    victim = tier.path_of(metas[2].key)
    assert victim is not None
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    header_damaged = tier.path_of(metas[3].key)
    assert header_damaged is not None
    data = bytearray(header_damaged.read_bytes())
    data[40] ^= 0xFF
    header_damaged.write_bytes(bytes(data))

    fresh_counters = Counters()
    again = FileTier(roots, 1 << 20, fresh_counters)
    assert not dead.exists()
    assert fresh_counters.snapshot()["disk_temp_files_removed"] == 1
    assert fresh_counters.snapshot()["corrupt_files"] == 1, "the header-damaged row is caught by the scan"
    assert len(again) == 4
    assert again.load(metas[2].key) is None, "the payload-damaged row is caught on load"
    assert fresh_counters.snapshot()["corrupt_files"] == 2
    for m in (metas[0], metas[1], metas[4]):
        got = again.load(m.key)
        assert got is not None
        assert bytes(got[1]) == bytes([m.tokens[0]]) * 500
    assert again.used_bytes == sum(p.stat().st_size for r in roots for p in r.glob("??/*.kvc"))


def test_file_tier_compresses_when_asked(tmp_path: Path) -> None:
    tier = FileTier([tmp_path], 1 << 20, compress_level=3)
    assert tier.publish(meta(1), bytes(100_000))
    assert tier.used_bytes < 10_000
    got = tier.load(meta(1).key)
    assert got is not None
    assert bytes(got[1]) == bytes(100_000)


def test_ram_file_tier_is_shared_between_instances(tmp_path: Path) -> None:
    """Two processes (here: two instances) over one tmpfs directory see each other's rows after a scan."""
    writer = FileTier.ram_file(1 << 20, root=tmp_path / "shm")
    assert writer.name == "ram_file"
    assert writer.publish(meta(5), b"shared")
    reader = FileTier.ram_file(1 << 20, root=tmp_path / "shm")
    got = reader.load(meta(5).key)
    assert got is not None
    assert bytes(got[1]) == b"shared"
