"""Counters stay consistent under concurrent updates."""

from __future__ import annotations

import threading

import pytest

from erllama.cache.counters import Counters, HitKind
from erllama.cache.kvc import SaveReason
from erllama.cache.policy import Veto


def test_named_like_the_reference() -> None:
    c = Counters()
    c.record_hit(HitKind.EXACT)
    c.record_hit(HitKind.COLD)
    c.record_hit(HitKind.PARTIAL, resumed=True)
    c.record_save(SaveReason.FINISH)
    c.record_veto(Veto.NOT_DUE)
    c.record_latency("save", 0.25)
    c.record_latency("save", 0.75)
    c.set_gauge("ram_bytes", 10)
    c.add_gauge("ram_bytes", 5)
    snap = c.snapshot()
    assert snap["hits_exact"] == 1
    assert snap["misses"] == 1
    assert snap["hits_resume"] == 1
    assert snap["hits_longest_prefix"] == 0
    assert snap["saves_finish"] == 1
    assert snap["vetoes_not_due"] == 1
    assert (snap["save_count"], snap["save_total_s"], snap["save_max_s"]) == (2, 1.0, 0.75)
    assert snap["ram_bytes"] == 15
    assert snap["saves_dropped"] == 0


def test_concurrent_updates_are_not_lost() -> None:
    c = Counters()

    def work() -> None:
        for _ in range(2000):
            c.record_hit(HitKind.PARTIAL)
            c.add_gauge("ram_bytes", 3)
            c.add_gauge("ram_bytes", -1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = c.snapshot()
    assert snap["hits_longest_prefix"] == 16_000
    assert snap["ram_bytes"] == 32_000


def test_a_misspelt_name_is_an_error_not_a_new_series() -> None:
    from erllama.errors import InvalidInputError

    c = Counters()
    for name in ("hit_exact", "disk_write_error", "_write_errors", "saves"):
        with pytest.raises(InvalidInputError, match="no cache counter"):
            c.incr(name)
    with pytest.raises(InvalidInputError, match="no cache counter"):
        c.set_gauge("ram_byte", 1)
    with pytest.raises(InvalidInputError, match="no cache counter"):
        c.record_latency("saves", 0.1)
    c.incr("disk_write_errors")  # a tier's counters carry its name, whatever it is
    c.incr("ram_file_write_errors")
    assert "hit_exact" not in c.snapshot()
    assert c.snapshot()["disk_write_errors"] == 1
