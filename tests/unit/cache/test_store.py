"""CacheStore: saves off the caller's thread, deduplication, dropped saves, lookups, promotion, restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from erllama.cache.counters import Counters
from erllama.cache.filetier import FileTier
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.cache.kvc import SaveReason
from erllama.cache.store import CacheStore
from erllama.cache.tier import RamTier
from erllama.cache.writer import SaveWriter

NS = Namespace("ef" * 32, "Q4_1", ctx_params_hash({"n_ctx": 4096}))
PROMPT = list(range(1000, 1300))


def test_save_then_lookup_and_load(tmp_path: Path) -> None:
    store = CacheStore([RamTier(1 << 20), FileTier([tmp_path], 1 << 22)])
    try:
        future = store.save(NS, PROMPT[:200], b"s" * 5000, SaveReason.COLD)
        assert future is not None
        assert future.result(timeout=10)
        hit = store.longest_prefix(NS, PROMPT, max_tokens=len(PROMPT) - 1)
        assert hit is not None
        assert hit.n_tokens == 200
        row = store.load(hit.key)
        assert row is not None
        assert bytes(row[1]) == b"s" * 5000
        assert store.longest_prefix(NS, [1, 2, 3]) is None
        snap = store.counters.snapshot()
        assert snap["saves_cold"] == 1
        assert (snap["hits_longest_prefix"], snap["misses"]) == (0, 0), "a lookup counts nothing: the caller does"
        assert store.save(NS, PROMPT[:200], b"s" * 5000, SaveReason.FINISH) is None, "already cached"
    finally:
        store.close()


def test_concurrent_saves_of_one_key_publish_once(tmp_path: Path) -> None:
    gate = threading.Event()
    publishes = []

    class SlowTier(RamTier):
        def publish(self, meta, payload):  # type: ignore[no-untyped-def]
            gate.wait(5)
            publishes.append(meta.key)
            return super().publish(meta, payload)

    store = CacheStore([SlowTier(1 << 20)])
    try:
        futures = [store.save(NS, PROMPT, b"x" * 100, SaveReason.FINISH) for _ in range(5)]
        assert all(f is futures[0] for f in futures)
        gate.set()
        assert futures[0] is not None
        assert futures[0].result(timeout=10)
        assert publishes == [cache_key(NS, PROMPT)]
        assert store.counters.snapshot()["saves_deduplicated"] == 4
    finally:
        store.close()


def test_a_full_writer_drops_and_counts_instead_of_blocking() -> None:
    gate = threading.Event()

    class StuckTier(RamTier):
        def publish(self, meta, payload):  # type: ignore[no-untyped-def]
            gate.wait(10)
            return super().publish(meta, payload)

    counters = Counters()
    store = CacheStore([StuckTier(1 << 20)], counters, writer=SaveWriter(counters, max_workers=1, max_pending=2))
    try:
        results = [store.save(NS, PROMPT[:i], b"x", SaveReason.CONTINUED) for i in range(10, 15)]
        assert sum(r is None for r in results) == 3
        assert counters.snapshot()["saves_dropped"] == 3
        gate.set()
    finally:
        store.close()


def test_sync_save(tmp_path: Path) -> None:
    store = CacheStore([FileTier([tmp_path], 1 << 22)])
    try:
        assert store.save_sync(NS, PROMPT, b"y" * 100, SaveReason.SHUTDOWN, timeout_s=10)
        assert cache_key(NS, PROMPT) in store
        assert not store.when_settled(cache_key(NS, PROMPT), lambda: None), "stored: nothing in flight to wait on"
        assert store.counters.snapshot()["saves_shutdown"] == 1
    finally:
        store.close()


def test_disk_hits_are_promoted_to_ram_and_survive_restart(tmp_path: Path) -> None:
    disk = FileTier([tmp_path], 1 << 22)
    store = CacheStore([disk])
    assert store.save_sync(NS, PROMPT[:64], b"z" * 3000, SaveReason.FINISH, timeout_s=10)
    store.close()

    ram = RamTier(1 << 20)
    again = CacheStore([ram, FileTier([tmp_path], 1 << 22)])
    try:
        hit = again.longest_prefix(NS, PROMPT, max_tokens=299)
        assert hit is not None
        assert hit.n_tokens == 64
        assert again.load(hit.key) is not None
        assert again.drain(10)  # promotion runs on the writer, off the request's time to first token
        assert hit.key in ram, "the disk hit was promoted"
        assert again.counters.snapshot()["promotions"] == 1
    finally:
        again.close()


def test_index_forgets_rows_the_tiers_evict() -> None:
    ram = RamTier(2500)
    store = CacheStore([ram])
    try:
        for n in (16, 32, 48):
            assert store.save_sync(NS, PROMPT[:n], b"w" * 1000, SaveReason.COLD, timeout_s=10)
        assert cache_key(NS, PROMPT[:16]) not in ram
        assert len(store.index) == len(ram) == 2
        hit = store.longest_prefix(NS, PROMPT[:20], max_tokens=20)
        assert hit is None, "the evicted 16-token row must not be offered"
        assert store.evict_bytes(1) > 0
        assert len(store.index) == len(ram) == 1
    finally:
        store.close()


def test_a_waiter_is_called_back_when_the_save_in_flight_settles() -> None:
    gate = threading.Event()

    class SlowTier(RamTier):
        def publish(self, meta, payload):  # type: ignore[no-untyped-def]
            gate.wait(5)
            return super().publish(meta, payload)

    store = CacheStore([SlowTier(1 << 20)])
    try:
        settled = threading.Event()
        store.save(NS, PROMPT, b"r" * 64, SaveReason.FINISH)
        key = cache_key(NS, PROMPT)
        assert store.pending(key)
        assert store.when_settled(key, settled.set)
        assert not settled.wait(0.05), "not published yet"
        gate.set()
        assert settled.wait(5)
        row = store.load(key)
        assert row is not None
        assert bytes(row[1]) == b"r" * 64
    finally:
        store.close()


def test_a_lazy_payload_is_read_only_for_a_save_that_happens() -> None:
    store = CacheStore([RamTier(1 << 20)])
    reads: list[int] = []

    def payload() -> bytes:
        reads.append(1)
        return b"p" * 32

    try:
        assert store.save_sync(NS, PROMPT, payload, SaveReason.COLD, timeout_s=5)
        assert store.save(NS, PROMPT, payload, SaveReason.FINISH) is None, "already stored"
        assert len(reads) == 1, "the stored row's state was not read again"
        snap = store.counters.snapshot()
        assert (snap["saves_cold"], snap["saves_already_cached"]) == (1, 1)
    finally:
        store.close()


def test_many_threads_saving_and_loading(tmp_path: Path) -> None:
    """No lost rows, budgets never exceeded, counters consistent with what the tiers hold."""
    counters = Counters()
    ram = RamTier(60_000, counters)
    disk = FileTier([tmp_path / "d1", tmp_path / "d2"], 10 << 20, counters)
    store = CacheStore([ram, disk], counters, writer=SaveWriter(counters, max_workers=4, max_pending=64))
    saved: dict[bytes, bytes] = {}
    lock = threading.Lock()
    peaks = {"ram": 0, "disk": 0}
    errors: list[str] = []

    def worker(t: int) -> None:
        for i in range(30):
            tokens = [t, i, *PROMPT[: 16 + i]]
            payload = bytes([t * 31 + i & 0xFF]) * (1000 + 37 * i)
            if store.save_sync(NS, tokens, payload, SaveReason.FINISH, timeout_s=30):
                with lock:
                    saved[bytes(cache_key(NS, tokens))] = payload
            peaks["ram"] = max(peaks["ram"], ram.used_bytes)
            peaks["disk"] = max(peaks["disk"], disk.used_bytes)
            hit = store.longest_prefix(NS, [t, i // 2, *PROMPT], max_tokens=10_000)
            if hit is not None:
                row = store.load(hit.key)
                if row is not None and bytes(row[1]) != saved.get(bytes(hit.key), bytes(row[1])):
                    errors.append(f"wrong bytes for {hit.key!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors
        assert len(saved) == 240
        assert peaks["ram"] <= ram.budget_bytes
        assert peaks["disk"] <= disk.budget_bytes
        # the disk budget holds everything, so no row may be lost, whatever the small RAM tier evicted
        for key, payload in saved.items():
            row = store.load(key)  # type: ignore[arg-type]
            assert row is not None
            assert bytes(row[1]) == payload
        snap = counters.snapshot()
        assert snap["saves_finish"] == 240
        assert snap["ram_bytes"] == ram.used_bytes
        assert snap["disk_bytes"] == disk.used_bytes
        assert snap["ram_rows"] == len(ram)
        assert snap["disk_rows"] == len(disk) == 240, "saves are written through to every tier"
        assert len(store.index) == len({*saved})
    finally:
        store.close()


def test_startup_reads_each_header_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = CacheStore([FileTier([tmp_path], 1 << 22)])
    for n in (16, 32, 48):
        assert first.save_sync(NS, PROMPT[:n], b"h" * 100, SaveReason.FINISH, timeout_s=10)
    first.close()
    from erllama.cache import kvc

    calls = []
    real = kvc.read_meta

    def counting(path: object) -> object:
        calls.append(path)
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(kvc, "read_meta", counting)
    again = CacheStore([FileTier([tmp_path], 1 << 22)])
    try:
        assert len(calls) == 3, "the scan reads each header once and the store reuses it"
        assert len(again.index) == 3
    finally:
        again.close()


def test_a_reserved_save_is_in_flight_until_filled() -> None:
    store = CacheStore([RamTier(1 << 20)])
    key = cache_key(NS, PROMPT)
    try:
        assert store.reserve(NS, PROMPT)
        assert store.pending(key)
        assert key not in store
        assert not store.reserve(NS, PROMPT), "a key is reserved once"
        assert not store.drain(0.05), "drain waits for the reservation"
        settled = threading.Event()
        assert store.when_settled(key, settled.set)
        future = store.save(NS, PROMPT, b"r" * 100, SaveReason.FINISH)  # fills it: no "already in flight"
        assert future is not None
        assert future.result(timeout=5)
        assert settled.wait(5)
        assert store.drain(5)
        assert key in store
        assert not store.pending(key)
        snap = store.counters.snapshot()
        assert (snap["saves_finish"], snap.get("saves_deduplicated", 0)) == (1, 0)
        assert not store.reserve(NS, PROMPT), "nothing to reserve once stored"
    finally:
        store.close()


def test_a_released_reservation_wakes_its_waiters_with_nothing() -> None:
    store = CacheStore([RamTier(1 << 20)])
    key = cache_key(NS, PROMPT)
    try:
        assert store.reserve(NS, PROMPT)
        settled = threading.Event()
        assert store.when_settled(key, settled.set)
        store.release(NS, PROMPT)
        assert settled.wait(5)
        assert key not in store
        assert store.drain(0.1)
        assert not store.pending(key)
        assert store.reserve(NS, PROMPT), "free to reserve again"
        store.release(NS, PROMPT)
    finally:
        store.close()


def test_a_row_is_restorable_from_the_fast_tier_while_the_slow_one_writes(tmp_path: Path) -> None:
    gate = threading.Event()

    class SlowDisk(FileTier):
        def publish(self, meta, payload):  # type: ignore[no-untyped-def]
            gate.wait(5)
            return super().publish(meta, payload)

    store = CacheStore([RamTier(1 << 20), SlowDisk([tmp_path], 1 << 22)])
    try:
        future = store.save(NS, PROMPT, b"d" * 1000, SaveReason.FINISH)
        assert future is not None
        deadline = time.monotonic() + 5
        while store.index.longest_prefix(NS, [*PROMPT, 7]) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        hit = store.index.longest_prefix(NS, [*PROMPT, 7])
        assert hit is not None, "indexed once the RAM tier holds it"
        assert hit.n_tokens == len(PROMPT)
        assert store.pending(hit.key), "while the disk tier is still writing"
        gate.set()
        assert future.result(timeout=10)
        assert store.tiers[1].metas()
        assert not store.pending(hit.key)
    finally:
        gate.set()
        store.close()
