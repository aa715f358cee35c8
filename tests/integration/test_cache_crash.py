"""Crash safety of file-tier publication: a writer killed with SIGKILL at random moments, 100 times.

After every kill a fresh tier scans the directory: no temp file of the dead writer survives, no corrupt row is ever
served, and every row the writer announced (printed after publish returned) is still there with its exact bytes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erllama.cache.counters import Counters
from erllama.cache.filetier import FileTier
from erllama.cache.key import Namespace, cache_key, ctx_params_hash

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NS = Namespace("9" * 64, "Q4_1", ctx_params_hash({"n_ctx": 4096}))

CHILD = r"""
import sys, time
from erllama.cache.kvc import RowMeta, SaveReason
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.cache.filetier import FileTier
ns = Namespace("9" * 64, "Q4_1", ctx_params_hash({"n_ctx": 4096}))
tier = FileTier([sys.argv[1]], 1 << 40)
i = int(sys.argv[2])
print("ready", flush=True)
while True:
    tokens = tuple(range(i, i + 24))
    meta = RowMeta(cache_key(ns, tokens), ns, tokens, SaveReason.COLD, created_ns=i)
    payload = bytes([i % 251]) * (20_000 + 997 * (i % 50))
    if tier.publish(meta, payload):
        print(i, flush=True)
    i += 1
"""


def _expected(i: int) -> tuple[bytes, bytes]:
    tokens = tuple(range(i, i + 24))
    return bytes(cache_key(NS, tokens)), bytes([i % 251]) * (20_000 + 997 * (i % 50))


def test_sigkill_never_leaves_a_corrupt_or_partial_row(tmp_path: Path) -> None:
    rng = random.Random(1234)
    announced: set[int] = set()
    next_i = 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(100):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(next_i)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        done = [int(line) for line in out.split()]
        announced.update(done)
        next_i = max([next_i, *done]) + 1 + 1  # skip the row that may have been mid-write

        counters = Counters()
        tier = FileTier([tmp_path], 1 << 40, counters)
        assert not list((tmp_path / "tmp").glob("*.tmp")), "a dead writer's temp file survived the scan"
        assert counters.snapshot()["corrupt_files"] == 0, "a published file was damaged"
        present = {bytes(m.key): m for m in tier.metas()}
        for i in announced:
            key, payload = _expected(i)
            assert key in present, f"row {i} was announced but is gone"
        for m in present.values():
            row = tier.load(m.key)
            assert row is not None
            _key, payload = _expected(m.tokens[0])
            assert bytes(row[1]) == payload, "a row was served with the wrong bytes"
    assert len(announced) > 100, "the writer should have published plenty of rows across 100 runs"
