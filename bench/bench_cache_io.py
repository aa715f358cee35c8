"""Save and load throughput per cache tier against a plain copy of the same bytes, measured in the same run.

    python bench/bench_cache_io.py [--size-mb 64] [--reps 9] [--disk-dir DIR]

Peers, chosen to do the same work minus the cache's own:

* ``ram``: save = ``RamTier.publish`` vs ``bytes(payload)`` (one memcpy); load = ``RamTier.load`` (a zero-copy
  view) vs copying the stored bytes once;
* ``ram_file`` (/dev/shm) and ``disk``: save = ``FileTier.publish`` (header, checksum, temp file, fsync, rename,
  directory fsync) vs writing the bytes to a file with fsync; load = ``FileTier.load`` (one read, checksum
  verified) vs reading the same file into a buffer.

Tier and peer alternate in ABBA order; each figure is the median over ``--reps``; the ratio is tier MB/s / plain
MB/s. Target: >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erllama.cache.filetier import FileTier
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.cache.kvc import RowMeta, SaveReason
from erllama.cache.tier import RamTier, Tier

NS = Namespace("5" * 64, "Q4_1", ctx_params_hash({"n_ctx": 8192}))


def interleaved(ours: Callable[[int], object], peer: Callable[[int], object], reps: int) -> tuple[float, float]:
    """Median seconds of each, the two alternating in ABBA order so drift (e.g. writeback) hits both."""
    a: list[float] = []
    b: list[float] = []
    for r in range(reps):
        for fn, out in ((ours, a), (peer, b)) if r % 2 == 0 else ((peer, b), (ours, a)):
            t0 = time.perf_counter()
            fn(r)
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def meta(i: int) -> RowMeta:
    tokens = tuple(range(i, i + 512))
    return RowMeta(cache_key(NS, tokens), NS, tokens, SaveReason.COLD, created_ns=i)


def plain_write(path: Path, payload: memoryview) -> None:
    with path.open("wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def plain_read(path: Path) -> None:
    with path.open("rb") as fh:
        buf = np.empty(path.stat().st_size, dtype=np.uint8)
        fh.readinto(buf.data)


def bench_tier(name: str, tier: Tier, plain_dir: Path | None, payload: memoryview, reps: int) -> list[str]:
    mb = len(payload) / 1e6
    if plain_dir is None:
        stored = bytes(payload)
        save_t, plain_save = interleaved(
            lambda r: tier.publish(meta(1000 + r), payload), lambda r: bytes(payload), reps
        )
        # a RAM load hands out a zero-copy view; the plain peer copies the bytes once
        load_t, plain_load = interleaved(lambda r: tier.load(meta(1000 + r).key), lambda r: bytearray(stored), reps)
    else:
        save_t, plain_save = interleaved(
            lambda r: tier.publish(meta(1000 + r), payload),
            lambda r: plain_write(plain_dir / f"plain{r}", payload),
            reps,
        )
        load_t, plain_load = interleaved(
            lambda r: tier.load(meta(1000 + r).key), lambda r: plain_read(plain_dir / f"plain{r}"), reps
        )
    rows = []
    for what, ours, peer in (("save", save_t, plain_save), ("load", load_t, plain_load)):
        rows.append(f"{name:9} {what:5} {mb / ours:12.0f} {mb / peer:12.0f} {peer / ours:7.2f}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--disk-dir", type=Path, default=None, help="default: a temp dir under ~/.cache/erllama")
    args = parser.parse_args()
    payload = memoryview(np.random.default_rng(0).integers(0, 256, args.size_mb << 20, dtype=np.uint8).tobytes())
    budget = (args.size_mb << 20) * (args.reps + 2) * 2
    print(f"payload {args.size_mb} MiB, median of {args.reps}; MB/s")
    print(f"{'tier':9} {'op':5} {'tier MB/s':>12} {'plain MB/s':>12} {'ratio':>7}")
    rows = bench_tier("ram", RamTier(budget), None, payload, args.reps)
    shm = Path("/dev/shm")
    disk_parent = args.disk_dir or Path.home() / ".cache" / "erllama"
    disk_parent.mkdir(parents=True, exist_ok=True)
    places = [("ram_file", shm)] if shm.is_dir() else []
    places.append(("disk", disk_parent))
    for name, parent in places:
        with tempfile.TemporaryDirectory(dir=parent) as tmp_s:
            tmp = Path(tmp_s)
            (tmp / "plain").mkdir()
            tier = FileTier([tmp / "tier"], budget, name=name)
            rows += bench_tier(name, tier, tmp / "plain", payload, args.reps)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
