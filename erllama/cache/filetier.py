"""``FileTier``: rows as KVC files under one or more directory roots — ``ram_file`` (a tmpfs such as ``/dev/shm``,
shareable between processes) and ``disk`` are both file tiers. The life of a row (reservation, write, rename,
publish, eviction) is drawn once, in :mod:`erllama.cache.tier`; this module adds the files: crash-safe writes
(temp file, fsync, rename, fsync of the directory), the startup scan that registers rows and removes dead writers'
temp files, read-only roots, rows found corrupt on load, and (``shared=True``) roots that several processes use at
once: each learns the rows the others publish and forgets the rows they delete.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from erllama.cache import kvc
from erllama.cache.counters import Counters
from erllama.cache.key import CacheKey
from erllama.cache.kvc import RowMeta
from erllama.cache.tier import Payload, TierBase, notify_dropped
from erllama.errors import CorruptCacheFileError, InvalidInputError

__all__ = ["FileTier"]

log = logging.getLogger("erllama.cache")


class FileTier(TierBase):
    """One KVC file per row under one or more roots (``ram_file`` on a tmpfs, or ``disk``).

    Publication is crash-safe: the row is written to a temp file in the root's ``tmp/`` directory, fsynced,
    renamed into place, and the directory is fsynced; a reader never sees a partial file, and a writer killed
    midway leaves only a temp file, removed by the next startup scan once its process is gone.

    Nothing in a root can keep the tier from coming up. The scan opens regular files only (never a symlink, a
    FIFO or a device; never a symlinked fan-out directory), skips and counts what it cannot read, and a root it
    cannot write (a read-only filesystem, ``tmp`` that is not a directory) serves its rows read-only: saves to it
    are refused and counted (``<name>_refused_read_only``), and the ``<name>_read_only_roots`` gauge says so. A
    row that fails to load for any reason is dropped and counted; the request goes on cold. Rows and directories
    are created owner-only (0600 / 0700): they hold prompts' token ids.

    **Shared roots** (``shared=True``: one directory on NFS, or on one machine, used by several erllama processes —
    a cluster's replicas). Every publish and every deletion appends the name of the fan-out directory it changed to
    ``<root>/.journal`` (three bytes, ``O_APPEND``); :meth:`refresh` stats that one file and, when it grew, reads
    the new lines and lists only the directories they name, registering rows that other processes published (from
    their self-describing headers) and forgetting rows they deleted. A new journal (one is started past 1 MiB) or
    one that could not be read makes the next refresh list every fan-out directory, and so does a refresh
    ``relist_s`` (a minute) after the last full listing (on NFS, appends from several clients are not atomic: a
    line may be lost). Each process enforces its budget over every row it knows of, its own and the others', by
    deleting the least recently used files; two processes evicting at once may delete a little more than needed,
    never a row being read (an open file stays readable after unlink) and never a partial one (rows appear by
    rename). A row that vanished between the index and the load is a miss, and the request goes on cold.
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]],
        budget_bytes: int,
        counters: Counters | None = None,
        *,
        name: str = "disk",
        compress_level: int | None = None,
        fsync: bool = True,
        shared: bool = False,
        relist_s: float = 60.0,
    ) -> None:
        if not roots:
            raise InvalidInputError("a file tier needs at least one root directory")
        super().__init__(name, budget_bytes, counters)
        self.roots = [Path(r) for r in roots]
        self.compress_level = compress_level
        self.fsync = fsync
        self.shared = shared
        self.relist_s = relist_s
        self._refresh_lock = threading.Lock()
        self._journal_at: dict[Path, tuple[int, int]] = {}  # root -> (inode, bytes read) of its journal
        self._listed_at = time.monotonic()  # the last full listing (the startup scan is one)
        self._where: dict[CacheKey, Path] = {}
        self._root_bytes = dict.fromkeys(self.roots, 0)
        self._read_only: set[Path] = set()
        self._scanned: dict[CacheKey, RowMeta] | None = {}
        for root in self.roots:
            self._prepare(root)
        self._scan()

    @classmethod
    def ram_file(
        cls,
        budget_bytes: int,
        counters: Counters | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        compress_level: int | None = None,
    ) -> FileTier:
        """A ``ram_file`` tier: files on a tmpfs (default ``/dev/shm/erllama-<uid>``), shareable by processes."""
        base = Path(root) if root is not None else Path("/dev/shm") / f"erllama-{os.getuid()}"
        return cls([base], budget_bytes, counters, name="ram_file", compress_level=compress_level)

    def path_of(self, key: CacheKey) -> Path | None:
        return self._where.get(key)

    @property
    def read_only(self) -> bool:
        """True when no root takes new rows."""
        return len(self._read_only) == len(self.roots)

    # -- startup ----------------------------------------------------------------------------------------------

    def _prepare(self, root: Path) -> None:
        """Create the root and its ``tmp/`` (owner-only), and prove it writable with a probe file; a root that is
        not is served read-only, logged and counted."""
        why = None
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = root / "tmp"
            if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
                why = f"{tmp} is not a directory"
            else:
                tmp.mkdir(mode=0o700, exist_ok=True)
                probe = tmp / f".probe.{_WRITER_ID}.{uuid.uuid4().hex[:8]}"
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                probe.unlink()
        except OSError as exc:
            why = f"{exc.strerror or exc} ({exc.filename or root})"
        if why is not None:
            self._set_read_only(root, why)

    def _set_read_only(self, root: Path, why: str) -> None:
        if root in self._read_only:
            return
        self._read_only.add(root)
        self._b.counters.set_gauge(f"{self.name}_read_only_roots", len(self._read_only))
        log.warning("cache tier %s: %s is read-only from now on: %s", self.name, root, why)

    def _skip(self, path: Path, why: str) -> None:
        self._b.counters.incr(f"{self.name}_skipped_entries")
        log.warning("cache tier %s: skipped %s: %s", self.name, path, why)

    def _scan(self) -> None:
        """Remove dead writers' temp files; register every valid row from its header (one bounded read each).
        Rows the budget cannot hold (a smaller budget than last time) are deleted, least recently used first."""
        found: list[tuple[float, RowMeta, int, Path]] = []
        for root in self.roots:
            self._journal_at[root] = _inode_size(root / _JOURNAL)
            if root not in self._read_only:
                self._scan_tmp(root)
            for path in self._row_paths(root):
                try:
                    meta, size = kvc.read_meta(path)
                    if kvc.file_name(meta.key) != path.name:
                        raise CorruptCacheFileError("file name does not match its key", str(path))
                    mtime = os.stat(path, follow_symlinks=False).st_mtime
                except CorruptCacheFileError as exc:
                    self._b.counters.incr("corrupt_files")
                    log.warning("cache tier %s: dropped %s", self.name, exc)
                    _unlink_quietly(path)  # (a directory named like a row stays: unlink never removes one)
                    continue
                except FileNotFoundError:
                    continue
                except OSError as exc:  # EACCES, EIO, ESTALE, ...: left where it is, never served
                    self._skip(path, exc.strerror or str(exc))
                    continue
                found.append((mtime, meta, size, path))
        scanned: dict[CacheKey, RowMeta] = {}
        for _mtime, meta, size, path in sorted(found, key=lambda f: f[0]):  # oldest first: LRU order survives
            key = meta.key
            if key in self._where:  # the same row under two roots: keep the newer copy
                self.remove(key)
            evicted = self._b.reserve(key, size)
            if evicted is None:
                if self._root_of(path) not in self._read_only:
                    _unlink_quietly(path)
                continue
            for victim, victim_size in evicted:
                self._delete_file(victim, victim_size)
                scanned.pop(victim, None)
                self._b.counters.incr(f"{self.name}_scan_evictions")
            scanned[key] = meta
            self._where[key] = path
            self._root_bytes[self._root_of(path)] += size
            self._b.commit(key, size)
        self._scanned = scanned

    def _scan_tmp(self, root: Path) -> None:
        try:
            entries = list(os.scandir(root / "tmp"))
        except OSError as exc:
            self._skip(root / "tmp", exc.strerror or str(exc))
            return
        for entry in entries:
            if not entry.name.endswith(".tmp") or entry.is_dir(follow_symlinks=False):
                continue
            if _writer_alive(entry.name):
                continue
            if _unlink_quietly(Path(entry.path)):
                self._b.counters.incr(f"{self.name}_temp_files_removed")
            else:
                self._skip(Path(entry.path), "a dead writer's temp file that cannot be removed")

    def _row_paths(self, root: Path) -> list[Path]:
        """``<root>/<2 hex>/<name>.kvc`` entries, without following a symlinked fan-out directory."""
        out: list[Path] = []
        try:
            fans = [e for e in os.scandir(root) if len(e.name) == 2 and e.name != ".."]
        except OSError as exc:
            self._skip(root, exc.strerror or str(exc))
            return out
        for fan in fans:
            if not fan.is_dir(follow_symlinks=False):
                if fan.is_symlink():
                    self._skip(Path(fan.path), "a symbolic link, not a directory")
                continue
            try:
                out.extend(Path(e.path) for e in os.scandir(fan.path) if e.name.endswith(".kvc"))
            except OSError as exc:
                self._skip(Path(fan.path), exc.strerror or str(exc))
        return out

    def _root_of(self, path: Path) -> Path:
        return path.parent.parent

    # -- rows ---------------------------------------------------------------------------------------------------

    def publish(self, meta: RowMeta, payload: Payload) -> bool:
        writable = [r for r in self.roots if r not in self._read_only]
        if not writable:
            self._b.counters.incr(f"{self.name}_refused_read_only")
            return False
        t0 = time.perf_counter()
        segments = kvc.encode(meta, payload, compress_level=self.compress_level)
        size = sum(len(s) for s in segments)
        if not self._make_room(meta.key, size):
            return False
        root = min(writable, key=lambda r: self._root_bytes[r])
        final = kvc.path_for(root, meta.key)
        tmp = root / "tmp" / f"{bytes(meta.key).hex()}.{_WRITER_ID}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            with os.fdopen(fd, "wb") as fh:
                kvc.write_segments(fh, segments)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
            if self.shared:
                _journal(root, final.parent.name)
        except OSError as exc:
            _unlink_quietly(tmp)
            self._b.release(size)
            self._b.counters.incr(f"{self.name}_write_errors")
            if exc.errno == errno.EROFS:
                self._set_read_only(root, exc.strerror or "read-only filesystem")
            raise
        self._where[meta.key] = final
        self._root_bytes[root] += size
        self._b.commit(meta.key, size)
        self._b.counters.record_latency(f"{self.name}_save", time.perf_counter() - t0)
        return True

    def load(self, key: CacheKey) -> tuple[RowMeta, memoryview] | None:
        if not self._b.touch_and_pin(key):
            return None
        t0 = time.perf_counter()
        try:
            path = self._where.get(key)
            if path is None:
                return None
            meta, state = kvc.read_row(path, max_bytes=self._b.sizes.get(key))
            if meta.key != key:
                raise CorruptCacheFileError("row holds another key", str(path))
        except CorruptCacheFileError as exc:
            self._b.counters.incr("corrupt_files")
            log.warning("cache tier %s: dropped %s", self.name, exc)
            self._b.unpin(key)
            self.remove(key)
            return None
        except FileNotFoundError:
            self._b.unpin(key)
            self._forget(key)
            notify_dropped(self.on_drop, [key])
            return None
        except OSError as exc:  # EACCES, EISDIR, EIO, ESTALE, ...: the row is dropped, the request goes on cold
            self._b.counters.incr(f"{self.name}_load_errors")
            log.warning("cache tier %s: dropped row %s: %s", self.name, path, exc.strerror or exc)
            self._b.unpin(key)
            self.remove(key)
            return None
        self._b.unpin(key)
        self._b.counters.record_latency(f"{self.name}_load", time.perf_counter() - t0)
        return meta, state

    def _make_room(self, key: CacheKey, size: int) -> bool:
        """Reserve ``size`` bytes for ``key``, deleting least-recently-used rows as the budget needs; False when
        it cannot be had (refused and counted by the budget)."""
        evicted = self._b.reserve(key, size)
        if evicted is None:
            return False
        for victim, victim_size in evicted:
            self._delete_file(victim, victim_size)
        notify_dropped(self.on_drop, [k for k, _ in evicted])
        return True

    def _forget(self, key: CacheKey) -> Path | None:
        size = self._b.sizes.get(key, 0)
        path = self._where.pop(key, None)
        if self._b.forget(key) and path is not None:
            self._root_bytes[self._root_of(path)] -= size
        return path

    def _delete_file(self, key: CacheKey, size: int) -> None:
        """Delete the file of a row the budget already let go of."""
        path = self._where.pop(key, None)
        if path is not None:
            self._root_bytes[self._root_of(path)] -= size
            self._unlink(path)

    def _unlink(self, path: Path) -> None:
        if _unlink_quietly(path) and self.shared:
            _journal(self._root_of(path), path.parent.name)

    def remove(self, key: CacheKey) -> bool:
        path = self._forget(key)
        if path is None:
            return False
        self._unlink(path)
        notify_dropped(self.on_drop, [key])
        return True

    # -- shared roots -------------------------------------------------------------------------------------------

    def refresh(self) -> list[RowMeta]:
        """Learn what other processes did to shared roots since the last look: the rows they published (returned,
        and registered here) and the rows they deleted (forgotten here, announced through ``on_drop``). One stat
        per root when nothing changed; a no-op (an empty list) for a tier that is not shared."""
        if not self.shared:
            return []
        learned: list[RowMeta] = []
        with self._refresh_lock:
            relist = time.monotonic() - self._listed_at >= self.relist_s
            if relist:
                self._listed_at = time.monotonic()
            for root in self.roots:
                fans = self._journal_news(root)
                if relist:
                    fans = None
                if fans is None or fans:
                    learned.extend(self._relist(root, fans))
        return learned

    def _journal_news(self, root: Path) -> set[str] | None:
        """The fan-out directories the journal names since the last look (empty: nothing changed); None: list
        them all (the journal was cut, or cannot be read)."""
        path = root / _JOURNAL
        inode, at = self._journal_at.get(root, (0, 0))
        now, size = _inode_size(path)
        if (now, size) == (inode, at):
            return set()
        if now != inode or size < at:  # a new journal: what happened before it is only in the directories
            self._journal_at[root] = (now, size)
            return None
        try:
            with open(path, "rb") as fh:
                fh.seek(at)
                news = fh.read(size - at)
        except OSError:
            return None
        done = news.rfind(b"\n") + 1  # a line still being appended is read next time
        self._journal_at[root] = (inode, at + done)
        return {line.decode("ascii", "replace") for line in news[:done].split(b"\n") if len(line) == 2}

    def _relist(self, root: Path, fans: set[str] | None) -> list[RowMeta]:
        if fans is None:
            try:
                fans = {e.name for e in os.scandir(root) if len(e.name) == 2 and e.is_dir(follow_symlinks=False)}
            except OSError as exc:
                self._skip(root, exc.strerror or str(exc))
                return []
        by_fan: dict[Path, dict[str, CacheKey]] = {}
        for key, path in list(self._where.items()):
            by_fan.setdefault(path.parent, {})[path.name] = key
        learned: list[RowMeta] = []
        for fan in sorted(root / name for name in fans):
            try:
                names = {e.name for e in os.scandir(fan) if e.name.endswith(".kvc")}
            except FileNotFoundError:
                names = set()
            except OSError as exc:
                self._skip(fan, exc.strerror or str(exc))
                continue
            known = by_fan.get(fan, {})
            for name in known.keys() - names:  # deleted by another process
                key = known[name]
                if self._forget(key) is not None:
                    self._b.counters.incr(f"{self.name}_rows_gone")
                    notify_dropped(self.on_drop, [key])
            for name in sorted(names - known.keys()):
                meta = self._adopt(fan / name)
                if meta is not None:
                    learned.append(meta)
        return learned

    def _adopt(self, path: Path) -> RowMeta | None:
        """Register a row another process published (its header read once); None when it is gone, unreadable,
        already known or over the budget."""
        try:
            meta, size = kvc.read_meta(path)
            if kvc.file_name(meta.key) != path.name:
                raise CorruptCacheFileError("file name does not match its key", str(path))
        except FileNotFoundError:
            return None
        except CorruptCacheFileError as exc:  # a partial file never appears (rename); this one is damaged
            self._b.counters.incr("corrupt_files")
            log.warning("cache tier %s: ignored %s", self.name, exc)
            return None
        except OSError as exc:
            self._skip(path, exc.strerror or str(exc))
            return None
        if meta.key in self._where:
            return None
        if not self._make_room(meta.key, size):
            return None
        self._where[meta.key] = path
        self._root_bytes[self._root_of(path)] += size
        self._b.commit(meta.key, size)
        self._b.counters.incr(f"{self.name}_rows_learned")
        return meta

    def evict(self, n_bytes: int) -> int:
        freed = 0
        for key in self._b.lru_victims(n_bytes):
            size = self._b.sizes.get(key, 0)
            if self.remove(key):
                freed += size
                self._b.counters.incr("evictions")
        return freed

    def meta_of(self, key: CacheKey) -> RowMeta | None:
        path = self._where.get(key)
        if path is None:
            return None
        try:
            return kvc.read_meta(path)[0]
        except (OSError, CorruptCacheFileError):
            return None

    def metas(self) -> list[RowMeta]:
        """Metadata of every row. The first call after startup reuses what the scan read (no second read)."""
        scanned, self._scanned = self._scanned, None
        if scanned is not None:
            return [meta for key, meta in scanned.items() if key in self._where]
        out = []
        for key, path in list(self._where.items()):
            try:
                out.append(kvc.read_meta(path)[0])
            except (OSError, CorruptCacheFileError):
                self.remove(key)
        return out


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc``), or None where there is none.
    With the pid it names one process for good: a pid reused later (a container's PID 1 after a restart) has
    another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat_line = fh.read()
        return stat_line[stat_line.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


_WRITER_ID = f"{os.getpid()}-{_process_start(os.getpid()) or 0}"


def _writer_alive(tmp_name: str) -> bool:
    """Temp files are named ``<key>.<pid>-<start>.<nonce>.tmp``: a writer is alive while a process of that pid
    exists and (where ``/proc`` tells) started at that time. Names without a start time (older writers) count by
    their pid, except this process's own pid, which then belonged to an earlier process."""
    parts = tmp_name.split(".")
    if len(parts) < 3:
        return False
    pid_text, _, start = parts[1].partition("-")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return parts[1] == _WRITER_ID
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    now = _process_start(pid)
    return not start or now is None or start in ("0", now)


def _unlink_quietly(path: Path) -> bool:
    """Unlink a file (or a link, FIFO, socket); False when it could not be (a read-only filesystem, a directory)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


_JOURNAL = ".journal"  # a shared root's change log: one line per publish or deletion, naming its fan-out directory
_JOURNAL_CUT = 1 << 20


def _inode_size(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    return st.st_ino, st.st_size


def _journal(root: Path, fan: str) -> None:
    """Append ``fan`` to the root's journal; past 1 MiB, an empty journal is renamed over it (a new inode: readers
    then list every fan-out directory once). Failures are ignored: the others learn at the next journaled change."""
    path = root / _JOURNAL
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.write(fd, fan.encode("ascii") + b"\n")
            full = os.fstat(fd).st_size > _JOURNAL_CUT
        finally:
            os.close(fd)
        if full:
            fresh = root / "tmp" / f"journal.{_WRITER_ID}.{uuid.uuid4().hex[:8]}.tmp"
            os.close(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.replace(fresh, path)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
