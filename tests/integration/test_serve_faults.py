"""``erllama serve`` as a process against what a crash, a disk or an operator leaves behind: a kv directory full
of odd entries does not keep it from starting (it serves, and ``/metrics`` and its log say what it skipped), and
SIGTERM during a reply lets the reply finish and keeps its finish row on disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from erllama.cache import FileTier, kvc
from erllama.cache.counters import Counters
from erllama.cache.key import Namespace, cache_key, ctx_params_hash
from erllama.cache.kvc import SaveReason
from erllama.testing import wait_until_up

pytestmark = pytest.mark.native
ROOT = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, model: Path, kv_dir: Path, log: Path, *extra: str) -> None:
        self.port = _port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "erllama", "serve", "--model", str(model), "--name", "tiny",
               "--port", str(self.port), "--threads", "1", "--parallel", "2", "--ctx", "512",
               "--kv-dir", str(kv_dir), "--disk-cache-mb", "64", "--log-level", "warning", *extra]  # fmt: skip
        env = {**os.environ, "ERLLAMA_HOME": str(kv_dir.parent / "home")}
        with log.open("w") as sink:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60) -> None:
        try:
            wait_until_up(f"{self.base}/health/ready", self.proc, timeout_s=timeout_s, what="erllama serve")
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{self.log.read_text()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemon_factory(tiny_path: Path, tmp_path: Path) -> Iterator[object]:
    started: list[Daemon] = []

    def make(kv_dir: Path, *extra: str) -> Daemon:
        d = Daemon(tiny_path, kv_dir, tmp_path / f"serve{len(started)}.log", *extra)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


NS = Namespace("ab" * 32, "F32", ctx_params_hash({"n_ctx": 512}))


def odd_kv_dir(kv: Path) -> None:
    """Every odd entry a crash, a full disk or a careless operator leaves in a kv directory."""
    good = FileTier([kv], 1 << 20, Counters())
    rows = [kvc.RowMeta(cache_key(NS, (i, i + 1, i + 2)), NS, (i, i + 1, i + 2), SaveReason.COLD, 0) for i in range(4)]
    for m in rows:
        assert good.publish(m, b"s" * 100)
    names = [kvc.file_name(cache_key(NS, (900 + i,))) for i in range(4)]
    for name in names:
        (kv / name[:2]).mkdir(exist_ok=True)
    (kv / names[0][:2] / names[0]).mkdir()  # a directory named like a row
    os.mkfifo(kv / names[1][:2] / names[1])  # a FIFO named like a row: opened blocking, startup would hang
    (kv / names[2][:2] / names[2]).symlink_to("/etc/hostname")  # a symlink named like a row
    (kv / names[3][:2] / names[3]).write_bytes(b"KVC\0garbage")  # a damaged row
    (kv / "tmp" / f"{'cd' * 32}.{2**22 + 1}.deadbeef.tmp").mkdir()  # a directory where a temp file was
    (kv / "tmp" / f"{'ce' * 32}.{2**22 + 1}.deadbeef.tmp").write_bytes(b"partial")  # a dead writer's temp file


def test_an_odd_kv_directory_never_blocks_startup(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kv = tmp_path / "kv"
    odd_kv_dir(kv)
    d = daemon_factory(kv)
    d.wait_ready()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(f"{d.base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    metrics = httpx.get(f"{d.base}/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("erllama_cache_") and not line.startswith("#")
    }
    assert values["erllama_cache_corrupt_files"] >= 3  # the directory, the FIFO, the symlink, the damaged row
    assert values["erllama_cache_disk_temp_files_removed"] == 1
    assert values['erllama_cache_tier_rows{tier="disk"}'] == 4
    d.stop()
    log = d.log.read_text()
    assert "not a regular file" in log
    assert "symbolic link" in log
    assert "/etc/hostname" not in log or Path("/etc/hostname").exists(), "the link's target is never touched"


def test_a_read_only_kv_directory_still_serves(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kv = tmp_path / "kv"
    odd_kv_dir(kv)
    for child in (kv / "tmp").iterdir():
        if child.is_dir():
            child.rmdir()
        else:
            child.unlink()
    (kv / "tmp").rmdir()
    (kv / "tmp").write_bytes(b"")  # tmp is a file: nothing can be published, rows can still be read
    d = daemon_factory(kv)
    d.wait_ready()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert httpx.post(f"{d.base}/v1/chat/completions", json=body, timeout=60).status_code == 200
    metrics = httpx.get(f"{d.base}/metrics").text
    assert "erllama_cache_disk_read_only_roots 1.0" in metrics
    d.stop()
    assert "read-only" in d.log.read_text()


def test_sigterm_during_a_reply_keeps_its_finish_row(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kv = tmp_path / "kv"
    d = daemon_factory(kv)
    d.wait_ready()
    body = {
        "model": "tiny",
        "prompt": "The story so far: " * 8,
        "max_tokens": 120,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.Client(base_url=d.base, timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]
        d.proc.send_signal(signal.SIGTERM)  # mid-reply
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]", "the reply in flight is finished, not cut"
    chunks = [json.loads(line[6:]) for line in rest[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    usage = next(c["usage"] for c in chunks if c.get("usage"))
    assert d.proc.wait(60) == 0, d.log.read_text()
    tier = FileTier([kv], 1 << 30, Counters())
    reasons = {m.save_reason for m in tier.metas()}
    longest = max(m.n_tokens for m in tier.metas())
    assert SaveReason.FINISH in reasons, (reasons, d.log.read_text())
    assert longest >= usage["prompt_tokens"] + 120, "the finish row holds the whole reply"


def test_half_sent_requests_do_not_hold_connections(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A slowloris client: request lines and headers that never complete are cut after --header-timeout; a
    request whose headers did complete is not, however long it takes."""
    d = daemon_factory(tmp_path / "kv", "--header-timeout", "1")
    d.wait_ready()
    half = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", d.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: app")
        s.settimeout(10)
        half.append(s)
    t0 = time.monotonic()
    for s in half:
        assert s.recv(1024) == b"", "the server closed the half-sent request"
        s.close()
    assert time.monotonic() - t0 < 8
    body = json.dumps({"model": "tiny", "prompt": "Count: ", "max_tokens": 8}).encode()

    def slowly() -> Iterator[bytes]:  # the headers are complete at once; the body takes longer than the deadline
        for i in range(0, len(body), 16):
            time.sleep(0.4)  # about 1.4 s in all
            yield body[i : i + 16]

    r = httpx.post(f"{d.base}/v1/completions", content=slowly(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
