"""``erllama cache`` and ``/erllama/v1/cache`` against an ``erllama serve`` with rows in all three tiers (ram,
ram_file, disk), the per-tier token metrics, and the same listing read straight from the kv directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from erllama.cli import main
from erllama.testing import free_port, wait_until_up

pytestmark = pytest.mark.native
ROOT = Path(__file__).resolve().parents[2]
TIERS = {"ram", "ram_file", "disk"}


def _metric(text: str, name: str, tier: str) -> float:
    found = re.search(rf'^{re.escape(name)}\{{tier="{tier}"\}} (\S+)$', text, re.M)
    assert found is not None, f"{name}{{tier={tier}}} is not in /metrics"
    return float(found[1])


def _settled(base: str) -> None:
    """Wait until the daemon's saves are written (its row count holds still for half a second)."""
    seen, deadline = -1, time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = httpx.get(f"{base}/erllama/v1/cache/stats").json()["rows"]
        if rows == seen:
            return
        seen = rows
        time.sleep(0.5)
    raise AssertionError("the daemon's cache kept changing")


def test_cache_listing_through_the_daemon_and_from_its_directory(
    tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ERLLAMA_HOME": str(tmp_path / "home"), "ERLLAMA_HOST": base}
    kv = tmp_path / "cache" / "kv"
    cmd = [sys.executable, "-m", "erllama", "serve", "--model", str(tiny_path), "--name", "tiny", "--port", str(port),
           "--threads", "1", "--parallel", "2", "--ctx", "512", "--ram-cache-mb", "64", "--ram-file-cache-mb", "64",
           "--ram-file-dir", str(tmp_path / "shm"), "--disk-cache-mb", "64", "--kv-dir", str(kv),
           "--log-level", "warning"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        try:
            wait_until_up(f"{base}/health", proc, what="erllama serve")
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{log.read_text()}") from None
        prompts = ["the first prompt, long enough to be worth saving in every tier of the cache " * 2,
                   "a second and different prompt, also long enough to be saved by the policy " * 2]  # fmt: skip
        for prompt in [*prompts, prompts[0]]:  # the repeat is an exact hit
            r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3})
            assert r.status_code == 200, r.text
        exact = r.headers["x-erllama-cache"]
        assert "kind=exact" in exact
        _settled(base)

        listing = httpx.get(f"{base}/erllama/v1/cache").json()
        assert listing["count"] == len(listing["rows"]) >= 4  # a cold and a finish row per prompt
        for row in listing["rows"]:
            assert set(row["tiers"]) == TIERS, row
            assert row["model"] == "tiny"
            assert row["text"]
            assert row["tokens"] > 0
            assert row["bytes"] > 0
        assert sum(row["hits"] for row in listing["rows"]) == 1  # the exact hit

        capsys.readouterr()
        assert main(["cache", "ls", "--json"], env) == 0
        cli = json.loads(capsys.readouterr().out)
        assert [r["key"] for r in cli["rows"]] == [r["key"] for r in listing["rows"]]
        assert main(["cache", "ls"], env) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split() == [
            "KEY",
            "MODEL",
            "TOKENS",
            "SIZE",
            "TIERS",
            "SAVED",
            "AGE",
            "HITS",
            "TEXT",
        ]

        key = listing["rows"][0]["key"]
        assert main(["cache", "show", key[:8], "--json"], env) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["key"] == key
        assert len(shown["token_ids"]) == shown["tokens"]

        stats = httpx.get(f"{base}/erllama/v1/cache/stats").json()
        metrics = httpx.get(f"{base}/metrics").text
        for tier in TIERS:
            assert stats["tiers"][tier]["rows"] == listing["count"]
            held = sum(r["tokens"] for r in listing["rows"])
            assert stats["tiers"][tier]["tokens"] == held
            assert _metric(metrics, "erllama_cache_tier_tokens", tier) == held
        restored = _metric(metrics, "erllama_cache_restored_tokens_by_tier_total", "ram")
        assert restored == stats["restored_tokens"] == stats["restored_tokens_by_tier"]["ram"] > 0
        assert stats["query_tokens"] > stats["restored_tokens"]
        assert main(["cache", "stats"], env) == 0
        assert "ram_file:" in capsys.readouterr().out

        on_disk = {r["key"] for r in listing["rows"]}
        assert main(["cache", "ls", "--dir", str(kv), "--json"], env) == 0
        offline = json.loads(capsys.readouterr().out)
        assert {r["key"] for r in offline["rows"]} == on_disk
        assert all(r["tiers"] == {"disk": r["bytes"]} for r in offline["rows"])

        assert main(["cache", "rm", key[:10], "--json"], env) == 0
        assert json.loads(capsys.readouterr().out)["deleted"] == 1
        left = {r["key"] for r in httpx.get(f"{base}/erllama/v1/cache").json()["rows"]}
        assert key not in left
        assert not list(kv.glob(f"*/{key}.kvc")), "the row's file went with it"
        assert main(["cache", "show", key[:10]], env) == 3  # no such row
        assert main(["cache", "rm", "zz"], env) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, log.read_text()
    # with no daemon, `cache ls` reads the default kv directory ($ERLLAMA_CACHE_DIR/kv)
    capsys.readouterr()
    assert main(["cache", "ls", "--json"], {**env, "ERLLAMA_CACHE_DIR": str(tmp_path / "cache")}) == 0
    after = json.loads(capsys.readouterr().out)
    assert key not in {r["key"] for r in after["rows"]}
    assert after["count"] >= len(left) - 1
