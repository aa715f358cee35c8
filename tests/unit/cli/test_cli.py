"""The CLI through ``main(argv, env)``: every store command, exit codes, ``--json``, and errors without a daemon."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from erllama.cli import EXIT_CODES, main
from tests.unit.store.fileserver import FileServer, Served, serve_files
from tests.unit.store.test_store import gguf_bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # no daemon answers at this address: commands that need one fail with exit code 4
    return {"ERLLAMA_HOME": str(tmp_path / "home"), "ERLLAMA_HOST": f"http://127.0.0.1:{_free_port()}"}


@pytest.fixture
def fs() -> Iterator[FileServer]:
    with serve_files() as server:
        yield server


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], code: int = 0) -> Any:
    assert main([*argv, "--json"], env) == code
    return json.loads(capsys.readouterr().out)


def test_exit_codes_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "cli.md").read_text()
    for code in EXIT_CODES.values():
        assert f"| {code} |" in doc


def test_usage_errors_and_help(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], env) == 0
    assert "pull" in capsys.readouterr().out
    assert main(["frobnicate"], env) == EXIT_CODES["usage"]
    assert main(["pull"], env) == EXIT_CODES["usage"]
    assert main(["list", "--bogus"], env) == EXIT_CODES["usage"]
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_version(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    import erllama

    data = run_json(capsys, ["version"], env)
    assert data["erllama"] == erllama.__version__
    assert "llama.cpp" in data
    try:
        from erllama._native import library

        lib = library()
    except ImportError:
        return  # not built: version still answers
    assert data["cpu_variant"] == lib.cpu_variant, "version shows the CPU kernels in use"
    assert data["patches"] == [p["name"] for p in lib.manifest.get("patches", [])]
    assert data["selfcheck"] == lib.selfcheck


def test_pull_list_show_rm(tiny_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_json(capsys, ["list"], env) == []
    pulled = run_json(capsys, ["pull", str(tiny_path), "--name", "tiny:test"], env)
    assert pulled["name"] == "tiny:test"
    assert pulled["digest"] == "sha256:" + hashlib.sha256(tiny_path.read_bytes()).hexdigest()
    assert [m["name"] for m in run_json(capsys, ["ls"], env)] == ["tiny:test"]
    shown = run_json(capsys, ["show", "tiny"], env)  # a bare name finds its only tag
    assert shown["architecture"] == "llama"
    assert shown["parameters"] > 0
    assert shown["layers"] >= 1
    assert shown["quantization"]
    assert shown["context_length"] > 0
    assert "digest" in shown
    assert main(["show", "tiny:test", "--template"], env) == 0
    assert "message" in capsys.readouterr().out  # the tiny model carries a chat template
    assert main(["show", "tiny:test"], env) == 0
    text = capsys.readouterr().out
    assert "architecture" in text
    assert "llama" in text
    assert run_json(capsys, ["rm", "tiny:test"], env) == {"removed": ["tiny:test"]}
    assert run_json(capsys, ["list"], env) == []


def test_failures_have_their_exit_codes(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["show", "nothing"], "not_found"),
        (["rm", "nothing"], "not_found"),
        (["pull", str(tmp_path / "absent.gguf")], "not_found"),
        (["pull", "not-in-catalog"], "not_found"),
        (["pull", "file:///etc/passwd"], "invalid"),
        (["pull", "http://example.com/x.gguf"], "invalid"),
        (["pull", "x.gguf", "--name", "../escape"], "invalid"),
        (["ps"], "no_daemon"),
        (["stop", "smollm2"], "no_daemon"),
    ]
    for argv, kind in cases:
        data = run_json(capsys, argv, env, EXIT_CODES[kind])
        assert data["exit_code"] == EXIT_CODES[kind], argv
        assert data["error"], argv
    notgguf = tmp_path / "notes.gguf"
    notgguf.write_text("hello")
    assert main(["pull", str(notgguf)], env) == EXIT_CODES["verify"]
    assert "not a GGUF file" in capsys.readouterr().err


def test_pull_over_http_with_progress(fs: FileServer, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    body = gguf_bytes(500_000, seed=11)
    fs.files["/m/Remote.gguf"] = Served(body)
    digest = hashlib.sha256(body).hexdigest()
    assert main(["pull", f"{fs.url}/m/Remote.gguf", "--sha256", digest], env) == 0
    captured = capsys.readouterr()
    assert "remote:latest" in captured.out
    progress = captured.err.splitlines()
    assert progress[0] == "resolving source"
    assert any(line.endswith("500.0 KB/500.0 KB") for line in progress)
    assert progress[-1] == "success"
    assert (
        main(["pull", f"{fs.url}/m/Remote.gguf", "--name", "again", "--sha256", "0" * 64], env) == EXIT_CODES["verify"]
    )


def test_prompts_from_arguments_stdin_and_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import io

    from erllama.cli.run import _prompts

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert list(_prompts(argparse.Namespace(prompt=["say", "hi"]), io.StringIO("ignored"))) == ["say hi"]
    assert list(_prompts(argparse.Namespace(prompt=[]), io.StringIO("  from a pipe\n"))) == ["from a pipe"]
    assert list(_prompts(argparse.Namespace(prompt=[]), io.StringIO("\n"))) == []
    answers = iter(["first", "", "second", "/bye", "never"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(answers))
    assert list(_prompts(argparse.Namespace(prompt=[]), Tty())) == ["first", "second"]


def test_run_through_a_daemon_streams_as_records_arrive() -> None:
    import argparse

    from erllama.cli.output import Output
    from erllama.cli.run import _Remote

    written: list[str] = []

    class FakeDaemon:
        def chat(self, model: str, messages: Any, options: Any, *, explain: bool = False) -> Iterator[dict[str, Any]]:
            yield {"message": {"content": "Hel"}}
            assert written == ["Hel"], "the first piece is out before the next record is read"
            yield {"message": {"content": "lo"}, "done": True, "eval_count": 2, "eval_duration": 10**9}

    backend = _Remote(FakeDaemon(), "m", Output(as_json=False))  # type: ignore[arg-type]
    args = argparse.Namespace(max_tokens=2, temperature=0.0, seed=None)
    reply, stats = backend.turn([{"role": "user", "content": "hi"}], args, written.append)
    assert reply == "Hello"
    assert written == ["Hel", "lo"]
    assert stats["completion_tokens"] == 2


def test_ps_shows_never_for_a_model_that_never_expires() -> None:
    from erllama.cli.commands import _until

    assert _until("2318-01-01T00:00:00Z") == "never"  # what the API sends, as Ollama's does
    assert _until("2026-12-02T10:00:00Z") == "2026-12-02T10:00:00Z"


def test_run_verbose_asks_the_daemon_why_and_prints_it() -> None:
    import argparse

    from erllama.cli.output import Output
    from erllama.cli.run import _Remote, _stats_line

    asked: list[bool] = []
    why = "cache partial: restored 40 of 90 prompt tokens from ram; the prompt left the nearest cached row ..."

    class FakeDaemon:
        def chat(self, model: str, messages: Any, options: Any, *, explain: bool = False) -> Iterator[dict[str, Any]]:
            asked.append(explain)
            cache = {"hit": "partial", "prompt_tokens": 90, "cached_tokens": 40, "reason": why}
            yield {"message": {"content": "ok"}, "done": True, "eval_count": 1, "eval_duration": 1, "cache": cache}

    backend = _Remote(FakeDaemon(), "m", Output(as_json=False))  # type: ignore[arg-type]
    args = argparse.Namespace(max_tokens=2, temperature=0.0, seed=None, verbose=True)
    _, stats = backend.turn([{"role": "user", "content": "hi"}], args, lambda _t: None)
    assert asked == [True]
    assert stats["why"] == why
    line = _stats_line(stats)
    assert line.startswith("[cache partial: prompt 90 tokens, 40 cached")
    assert line.endswith(f"\n[{why}]")
