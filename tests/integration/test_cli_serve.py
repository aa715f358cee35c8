"""``erllama serve`` as a process, driven by the other commands: models load from the store on demand, ``run``
goes through the daemon, ``ps`` / ``stop`` see it, and SIGINT stops it cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from erllama.cli import main
from erllama.testing import wait_until_up

pytestmark = pytest.mark.native
ROOT = Path(__file__).resolve().parents[2]


def test_serve_run_ps_stop(tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "ERLLAMA_HOME": str(tmp_path / "home"), "ERLLAMA_HOST": f"http://127.0.0.1:{port}"}
    assert main(["pull", str(tiny_path), "--name", "tiny:1"], env) == 0
    cmd = [sys.executable, "-m", "erllama", "serve", "--port", str(port), "--threads", "1", "--parallel", "2",
           "--ctx", "512", "--disk-cache-mb", "0", "--log-level", "warning"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", proc, what="erllama serve")
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{log.read_text()}") from None
        capsys.readouterr()
        assert main(["ps", "--json"], env) == 0
        assert json.loads(capsys.readouterr().out)["models"] == []
        assert main(["run", "tiny", "--max-tokens", "5", "--json", "hello there"], env) == 0
        turn = json.loads(capsys.readouterr().out)["turns"][0]
        assert turn["stats"]["cache"] == "cold"  # the daemon says how its cache served the prompt
        assert turn["stats"]["prompt_tokens"] > 1
        assert turn["stats"]["cached_tokens"] == 0
        assert turn["stats"]["completion_tokens"] == 5
        assert main(["run", "tiny", "--max-tokens", "2", "-v", "hello there"], env) == 0
        line = re.search(r"\[cache (cold|partial|exact): prompt (\d+) tokens, (\d+) cached", capsys.readouterr().err)
        assert line is not None, "run -v prints the daemon's cache line"
        assert int(line[2]) == turn["stats"]["prompt_tokens"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models/tiny").status_code == 200  # the name requests use
        assert main(["ps", "--json"], env) == 0
        ps = json.loads(capsys.readouterr().out)
        assert [m["name"] for m in ps["models"]] == ["tiny:1"]
        from erllama._native import library  # the daemon loaded the same build this process tests

        assert ps["build"]["cpu_variant"] == library().cpu_variant, "ps shows the CPU kernels in use"
        assert ps["build"]["backend"] == library().backend
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert f'cpu_variant="{library().cpu_variant}"' in metrics, "so does /metrics (erllama_build_info)"
        assert main(["stop", "tiny", "--json"], env) == 0
        assert json.loads(capsys.readouterr().out)["stopped"] is True
        assert main(["stop", "nope"], env) == 3  # no such model (docs/cli.md)
        err = capsys.readouterr().err
        assert "erllama: error: the daemon" in err
        assert "'nope'" in err
        assert "error: '" not in err, "messages are not wrapped in stray quotes"
        tags = httpx.get(f"http://127.0.0.1:{port}/api/tags").json()["models"]
        assert [m["name"] for m in tags] == ["tiny:1"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, log.read_text()
    assert "erllama serving on" in log.read_text()
