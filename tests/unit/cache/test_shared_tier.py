"""Several processes on one shared disk tier (a cluster's replicas): each learns the rows the others publish and
forgets those they delete, through the root's journal; and the route summary a replica reports to the router."""

from __future__ import annotations

import os
from pathlib import Path

from erllama.cache.filetier import FileTier
from erllama.cache.index import PrefixIndex
from erllama.cache.key import BLOCK_TOKENS, Namespace, cache_key, ctx_params_hash
from erllama.cache.kvc import SaveReason, path_for
from erllama.cache.store import CacheStore

NS = Namespace("ab" * 32, "Q4_1", ctx_params_hash({"n_ctx": 4096}))
OTHER = Namespace("cd" * 32, "Q4_1", ctx_params_hash({"n_ctx": 4096}))
PROMPT = list(range(2000, 2300))


def _store(root: Path, budget: int = 1 << 22, *, shared: bool = True) -> CacheStore:
    return CacheStore([FileTier([root], budget, shared=shared)])


def test_a_row_published_by_one_process_is_restored_by_another(tmp_path: Path) -> None:
    a, b = _store(tmp_path), _store(tmp_path)
    try:
        assert b.longest_prefix(NS, PROMPT) is None
        assert a.save_sync(NS, PROMPT[:100], b"a" * 4000, SaveReason.FINISH, timeout_s=10)
        hit = b.longest_prefix(NS, PROMPT, max_tokens=299)
        assert hit is not None, "b learned a's row from the journal"
        assert hit.n_tokens == 100
        row = b.load(hit.key)
        assert row is not None
        assert bytes(row[1]) == b"a" * 4000
        assert b.counters.snapshot()["disk_rows_learned"] == 1
        assert b.refresh() == 0, "nothing new: one stat, no listing"
    finally:
        a.close()
        b.close()


def test_a_row_deleted_by_one_process_is_forgotten_by_the_other(tmp_path: Path) -> None:
    a, b = _store(tmp_path), _store(tmp_path)
    try:
        assert a.save_sync(NS, PROMPT[:100], b"a" * 4000, SaveReason.FINISH, timeout_s=10)
        key = cache_key(NS, PROMPT[:100])
        assert b.longest_prefix(NS, PROMPT) is not None
        assert a.remove(key)
        assert b.longest_prefix(NS, PROMPT) is None, "the journal told b the row is gone"
        assert key not in b
        assert b.counters.snapshot()["disk_rows_gone"] == 1
    finally:
        a.close()
        b.close()


def test_a_row_gone_between_index_and_load_is_a_miss(tmp_path: Path) -> None:
    a, b = _store(tmp_path), _store(tmp_path)
    try:
        assert a.save_sync(NS, PROMPT[:100], b"a" * 4000, SaveReason.FINISH, timeout_s=10)
        hit = b.longest_prefix(NS, PROMPT)
        assert hit is not None
        os.unlink(path_for(tmp_path, hit.key))  # deleted behind everyone's back: no journal line
        assert b.load(hit.key) is None
        assert hit.key not in b
    finally:
        a.close()
        b.close()


def test_each_process_keeps_its_budget_over_everyone_s_rows(tmp_path: Path) -> None:
    a, b = _store(tmp_path, 10_000), _store(tmp_path, 10_000)
    try:
        for i in range(4):  # ~4 KB rows: a keeps at most two of its own
            assert a.save_sync(NS, PROMPT[: 20 + i], bytes([i]) * 4000, SaveReason.FINISH, timeout_s=10)
        b.refresh()
        assert b.save_sync(NS, PROMPT[:50], b"b" * 4000, SaveReason.FINISH, timeout_s=10)
        files = list(tmp_path.glob("??/*.kvc"))
        assert sum(f.stat().st_size for f in files) <= 10_000, "b evicted a's rows to make room for its own"
        assert cache_key(NS, PROMPT[:50]) in b
        a.refresh()
        assert len(a.index) == len(files), "a forgot what b deleted"
    finally:
        a.close()
        b.close()


def test_a_cut_journal_makes_the_next_look_list_every_directory(tmp_path: Path) -> None:
    a, b = _store(tmp_path), _store(tmp_path)
    try:
        assert a.save_sync(NS, PROMPT[:40], b"x" * 1000, SaveReason.FINISH, timeout_s=10)
        assert a.save_sync(NS, PROMPT[:41], b"y" * 1000, SaveReason.FINISH, timeout_s=10)
        fresh = tmp_path / "fresh"
        fresh.touch()
        os.replace(fresh, tmp_path / ".journal")  # what a writer does past 1 MiB: lines b has not read are gone
        assert b.refresh() == 2
    finally:
        a.close()
        b.close()


def test_a_lost_journal_line_is_made_good_by_the_periodic_full_listing(tmp_path: Path) -> None:
    a = _store(tmp_path)
    assert a.save_sync(NS, [1, 2, 3], b"o" * 1000, SaveReason.FINISH, timeout_s=10)  # the journal exists
    trusting = _store(tmp_path)
    listing = CacheStore([FileTier([tmp_path], 1 << 22, shared=True, relist_s=0.0)])
    try:
        journal = tmp_path / ".journal"
        before = journal.read_bytes()
        assert a.save_sync(NS, PROMPT[:40], b"x" * 1000, SaveReason.FINISH, timeout_s=10)
        lost = before + b"\0" * (journal.stat().st_size - len(before))
        journal.write_bytes(lost)  # its line is lost (NFS): same file, same size
        assert listing.longest_prefix(NS, PROMPT) is not None
        assert trusting.longest_prefix(NS, PROMPT) is None, "only the journal told it, and said nothing"
    finally:
        for store in (a, trusting, listing):
            store.close()


def test_a_tier_that_is_not_shared_does_not_look(tmp_path: Path) -> None:
    a, b = _store(tmp_path), _store(tmp_path, shared=False)
    try:
        assert a.save_sync(NS, PROMPT[:40], b"x" * 1000, SaveReason.FINISH, timeout_s=10)
        assert b.longest_prefix(NS, PROMPT) is None
    finally:
        a.close()
        b.close()


def test_the_route_summary_counts_the_blocks_a_row_shares() -> None:
    index = PrefixIndex()
    assert index.summary().shared_tokens(PROMPT, chains={}) == 0
    index.add(NS, PROMPT[:100])  # 6 whole blocks
    index.add(OTHER, list(range(300)))
    summary = index.summary()
    assert summary.n_rows == 2
    assert summary.shared_tokens(PROMPT, chains={}) == 6 * BLOCK_TOKENS
    assert summary.shared_tokens(list(range(100)), chains={}) == 6 * BLOCK_TOKENS, "every namespace's rows count"
    changed = [*PROMPT[:40], 7, *PROMPT[41:]]
    assert summary.shared_tokens(changed, chains={}) == 2 * BLOCK_TOKENS, "stops at the first block that differs"
    longer = [*PROMPT[:100], *range(50)]
    assert summary.shared_tokens(longer, chains={}) == 6 * BLOCK_TOKENS
    assert summary.holds(cache_key(NS, PROMPT[:100]))
    assert not summary.holds(cache_key(NS, PROMPT[:99]))


def test_a_summary_is_reused_until_a_row_comes_or_goes() -> None:
    index = PrefixIndex()
    key = index.add(NS, PROMPT[:64])
    first = index.summary()
    assert index.summary() is first
    index.add(NS, PROMPT[:80])
    second = index.summary()
    assert second is not first
    assert second.n_rows == 2
    index.remove(key)
    assert index.summary().n_rows == 1


def test_a_capped_summary_keeps_the_newest_rows() -> None:
    index = PrefixIndex()
    index.add(NS, list(range(0, 320)))
    index.add(NS, list(range(1000, 1320)))
    summary = index.summary(max_links=5)
    assert summary.shared_tokens(list(range(1000, 1320)), chains={}) == 320
    assert summary.shared_tokens(list(range(0, 320)), chains={}) == 0
