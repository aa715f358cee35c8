"""``python -m erllama generate``: streams a reply through the runtime; a second run of the prompt is a cache hit."""

from __future__ import annotations

from pathlib import Path

import pytest

from erllama.__main__ import main

pytestmark = pytest.mark.native


def test_generate_twice_hits_the_cache(tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "a prompt long enough to be worth caching, with a few more words to pass the policy's minimum"
    argv = ["generate", "--model", str(tiny_path), "--raw", "--kv-dir", str(tmp_path / "kv"), "--max-tokens", "8"]
    argv += ["--again", "1", prompt]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    runs = [line for line in err.splitlines() if line.startswith("[run ")]
    assert len(runs) == 2
    assert "cache cold" in runs[0]
    assert "cache exact" in runs[1]
    replies = out.splitlines()
    assert replies[0] == replies[1]
    assert any((tmp_path / "kv").rglob("*.kvc")), "rows were written to the disk tier"
    # another invocation (a new process would do the same) finds the prompt on disk
    assert main([*argv[:-3], "--again", "0", prompt]) == 0
    assert "cache exact" in capsys.readouterr().err
