"""A file tier comes up whatever its directory holds: odd entries are skipped and counted, never opened unless they
are regular files, never followed through links; a root it cannot write is served read-only; a row that cannot be
read is dropped on load; rows the budget cannot hold are deleted at the scan, not orphaned."""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
from pathlib import Path

import pytest
import xxhash

from erllama.cache import CacheStore, kvc
from erllama.cache.counters import Counters
from erllama.cache.filetier import FileTier
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.cache.tier import RamTier, Tier

NS = Namespace("ef" * 32, "Q4_1", ctx_params_hash({"n_ctx": 2048}))
PAYLOAD = 2000


def meta(i: int, n: int = 24) -> kvc.RowMeta:
    tokens = tuple(range(i, i + n))
    return kvc.RowMeta(cache_key(NS, tokens), NS, tokens, kvc.SaveReason.FINISH, created_ns=i)


def fill(root: Path, n: int) -> list[kvc.RowMeta]:
    tier = FileTier([root], 1 << 22, Counters())
    metas = [meta(i) for i in range(n)]
    for m in metas:
        assert tier.publish(m, bytes([m.tokens[0]]) * PAYLOAD)
    return metas


def build_in_thread(root: Path, budget: int, counters: Counters) -> FileTier:
    """Construct the tier on a thread, so a scan that blocks (a FIFO opened for reading) fails the test."""
    out: list[FileTier | BaseException] = []

    def run() -> None:
        try:
            out.append(FileTier([root], budget, counters))
        except BaseException as exc:  # noqa: BLE001 - reported below
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the startup scan hung"
    got = out[0]
    if isinstance(got, BaseException):
        raise got
    return got


def lying_row(m: kvc.RowMeta, claimed: int) -> bytes:
    """A row whose header (checksum and all) claims a payload of ``claimed`` bytes it does not have."""
    head_tlv, body, trailer = kvc.encode(m, b"y" * PAYLOAD)
    magic, version, flags, tlv_len, _, _, _ = struct.unpack_from("<4sHHIQQQ", head_tlv)
    head = struct.pack("<4sHHIQQQ", magic, version, flags, tlv_len, claimed, claimed, 0)
    tlv = bytes(head_tlv[kvc.HEADER_SIZE :])
    digest = xxhash.xxh3_64_intdigest(head[:-8] + tlv)
    return head[:-8] + struct.pack("<Q", digest) + tlv + bytes(body) + bytes(trailer)


def row_path(root: Path, m: kvc.RowMeta) -> Path:
    return kvc.path_for(root, m.key)


def test_every_odd_entry_is_skipped_and_the_good_rows_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "kv"
    good = fill(root, 4)
    outside = tmp_path / "outside"
    outside.mkdir()
    odd = [meta(100 + i) for i in range(8)]
    # a directory named like a row
    row_path(root, odd[0]).parent.mkdir(exist_ok=True)
    row_path(root, odd[0]).mkdir()
    # a FIFO named like a row (opened blocking, the scan would wait for a writer forever)
    row_path(root, odd[1]).parent.mkdir(exist_ok=True)
    os.mkfifo(row_path(root, odd[1]))
    # a symlink named like a row, to a valid row outside the directory
    elsewhere = FileTier([outside / "other"], 1 << 20, Counters())
    assert elsewhere.publish(odd[2], b"x" * PAYLOAD)
    target = elsewhere.path_of(odd[2].key)
    assert target is not None
    row_path(root, odd[2]).parent.mkdir(exist_ok=True)
    row_path(root, odd[2]).symlink_to(target)
    # a symlinked fan-out directory holding a malformed "row" outside the directory
    (outside / "fan").mkdir()
    bait = outside / "fan" / kvc.file_name(odd[3].key)
    bait.write_bytes(b"not a row")
    name = kvc.file_name(odd[3].key)
    if not (root / name[:2]).exists():
        (root / name[:2]).symlink_to(outside / "fan", target_is_directory=True)
    # a row whose header claims a huge payload (it would push good rows out of the budget)
    liar = row_path(root, odd[4])
    liar.parent.mkdir(exist_ok=True)
    liar.write_bytes(lying_row(odd[4], claimed=3_900_000_000))
    # an unreadable row (EACCES; root ignores file modes, so the open is made to fail the way it would)
    unreadable = row_path(root, good[3])
    real_open = kvc.open_row_file

    def open_row_file(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
        if Path(path) == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path)

    monkeypatch.setattr(kvc, "open_row_file", open_row_file)
    # a directory where a dead writer's temp file was
    (root / "tmp" / f"{'ab' * 32}.{2**22 + 1}.deadbeef.tmp").mkdir()

    counters = Counters()
    with caplog.at_level(logging.WARNING, logger="erllama.cache"):
        tier = build_in_thread(root, 1 << 20, counters)
        store = CacheStore([RamTier(1 << 20), tier], counters)
    snap = counters.snapshot()
    assert len(tier) == 3, "the three readable good rows, nothing else"
    for m in good[:3]:
        got = store.load(m.key)
        assert got is not None
        assert bytes(got[1]) == bytes([m.tokens[0]]) * PAYLOAD
    for m in odd[:5]:
        assert tier.load(m.key) is None
    assert bait.exists(), "the scan never deletes through a symlinked directory"
    assert target.exists(), "nor what a symlinked row points to"
    assert row_path(root, odd[0]).is_dir()
    assert snap["disk_skipped_entries"] >= 2  # the unreadable row and the symlinked fan-out directory
    assert snap["corrupt_files"] >= 4  # the directory, the FIFO, the symlink and the lying header
    assert not tier.read_only
    text = caplog.text
    assert "Permission denied" in text
    assert "not a regular file" in text
    assert "symbolic link" in text
    assert "header claims" in text


def test_tmp_that_is_a_file_serves_read_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "kv"
    good = fill(root, 2)
    tmp = root / "tmp"
    for child in tmp.iterdir():
        child.unlink()
    tmp.rmdir()
    tmp.write_bytes(b"")
    counters = Counters()
    with caplog.at_level(logging.WARNING, logger="erllama.cache"):
        tier = build_in_thread(root, 1 << 20, counters)
    assert tier.read_only
    assert tier.load(good[0].key) is not None, "its rows are still served"
    assert not tier.publish(meta(50), b"z" * 10)
    snap = counters.snapshot()
    assert snap["disk_refused_read_only"] == 1
    assert snap["disk_read_only_roots"] == 1
    assert "read-only" in caplog.text
    assert "not a directory" in caplog.text


def test_read_only_filesystem_with_a_dead_writers_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk remounted read-only after a crash: the temp file cannot be removed and nothing can be written. (The
    filesystem is made read-only by failing every write and unlink under the root with EROFS, as the kernel would:
    mounting needs privileges a test does not have.)"""
    root = tmp_path / "kv"
    good = fill(root, 2)
    dead = root / "tmp" / f"{'cd' * 32}.{2**22 + 1}.deadbeef.tmp"
    dead.write_bytes(b"partial")
    real_open, real_unlink, real_mkdir = os.open, os.unlink, os.mkdir

    def under(path: object) -> bool:
        return str(path).startswith(str(root))

    def ro_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def ro_unlink(path: str, *, dir_fd: int | None = None) -> None:
        if under(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_unlink(path, dir_fd=dir_fd)

    def ro_mkdir(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if under(path):
            raise (FileExistsError if os.path.exists(path) else OSError)(errno.EROFS, "Read-only file system", path)
        real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "unlink", ro_unlink)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    counters = Counters()
    tier = build_in_thread(root, 1 << 20, counters)
    assert tier.read_only
    assert dead.exists()
    for m in good:
        assert tier.load(m.key) is not None
    store = CacheStore([RamTier(1 << 20), tier], counters)
    future = store.save(NS, meta(60).tokens, b"q" * 100, kvc.SaveReason.COLD)
    assert future is not None
    assert future.result(5), "the RAM tier takes the save; the disk refuses it"
    assert counters.snapshot()["disk_refused_read_only"] == 1


def test_a_row_that_fails_to_load_is_dropped_and_the_next_load_is_cold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "kv"
    good = fill(root, 3)
    counters = Counters()
    tier = FileTier([root], 1 << 20, counters)
    store = CacheStore([tier], counters)
    for kind, make in [
        ("EISDIR", lambda p: (p.unlink(), p.mkdir())),
        ("EIO", None),
        ("ESTALE", None),
    ]:
        m = good.pop()
        p = row_path(root, m)
        if make is not None:
            make(p)
        else:
            code = getattr(errno, kind)
            real = kvc.open_row_file

            def failing(path, _p=p, _code=code, _real=real):  # type: ignore[no-untyped-def]
                if Path(path) == _p:
                    raise OSError(_code, os.strerror(_code), str(path))
                return _real(path)

            monkeypatch.setattr(kvc, "open_row_file", failing)
        assert store.index.longest_prefix(NS, m.tokens) is not None
        assert store.load(m.key) is None, kind
        assert m.key not in store
        assert store.index.longest_prefix(NS, m.tokens) is None, f"{kind}: the index forgot the row"
    snap = counters.snapshot()
    assert snap["corrupt_files"] + snap["disk_load_errors"] == 3


def test_a_smaller_budget_deletes_what_it_cannot_hold(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    metas = fill(root, 10)
    size = sum(len(s) for s in kvc.encode(metas[0], b"0" * PAYLOAD))
    counters = Counters()
    tier = FileTier([root], 4 * size, counters)
    assert len(tier) == 4
    on_disk = list(root.glob("??/*.kvc"))
    assert len(on_disk) == 4, "rows outside the budget are deleted, not orphaned"
    assert sum(p.stat().st_size for p in on_disk) <= 4 * size
    assert counters.snapshot()["disk_scan_evictions"] == 6
    for p in on_disk:
        assert tier.load(kvc.read_meta(p)[0].key) is not None


def test_rows_are_private_and_a_reused_pid_does_not_keep_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    metas = fill(root, 1)
    p = row_path(root, metas[0])
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o700
    # a temp file left by an earlier process that had this very pid (a container's PID 1 after a restart)
    stale_old_format = root / "tmp" / f"{'ef' * 32}.{os.getpid()}.cafebabe.tmp"
    stale_new_format = root / "tmp" / f"{'ef' * 32}.{os.getpid()}-1.cafebabe.tmp"
    stale_old_format.write_bytes(b"x")
    stale_new_format.write_bytes(b"x")
    counters = Counters()
    FileTier([root], 1 << 20, counters)
    assert not stale_old_format.exists()
    assert not stale_new_format.exists()
    assert counters.snapshot()["disk_temp_files_removed"] == 2


def test_store_counts_what_its_tiers_counted_before_it_existed(tmp_path: Path) -> None:
    """``erllama serve`` built its tiers without the store's counters: everything they counted read 0."""
    root = tmp_path / "kv"
    metas = fill(root, 3)
    victim = row_path(root, metas[0])
    victim.write_bytes(b"garbage")
    (root / "tmp" / f"{'ab' * 32}.{2**22 + 1}.deadbeef.tmp").write_bytes(b"x")
    tiers: list[Tier] = [RamTier(1 << 20), FileTier([root], 1 << 20)]  # no counters passed: their own
    store = CacheStore(tiers)
    snap = store.counters.snapshot()
    assert snap["corrupt_files"] == 1
    assert snap["disk_temp_files_removed"] == 1
    assert snap["disk_rows"] == 2
    assert all(t.counters is store.counters for t in tiers)
    store.save(NS, meta(70).tokens, b"w" * 10, kvc.SaveReason.COLD)
    assert store.drain(5)
    assert store.counters.snapshot()["saves_cold"] == 1
    assert store.counters.snapshot()["disk_save_count"] == 1
    store.close()


def test_disk_write_errors_are_counted_and_the_fast_tier_keeps_the_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "kv"
    disk = FileTier([root], 1 << 20)
    store = CacheStore([RamTier(1 << 20), disk])
    real_open = os.open

    def full(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if str(path).startswith(str(root)) and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", full)
    with caplog.at_level(logging.WARNING, logger="erllama.cache"):
        for i in range(3):
            future = store.save(NS, meta(80 + i).tokens, b"v" * 10, kvc.SaveReason.COLD)
            assert future is not None
            assert future.result(5)
    snap = store.counters.snapshot()
    assert snap["disk_write_errors"] == 3
    assert snap["saves_cold"] == 3
    assert store.load(meta(80).key) is not None
    assert not list((root / "tmp").iterdir()), "no temp file is left behind"
    assert caplog.text.count("No space left") == 1, "logged once, not per save"
    store.close()
