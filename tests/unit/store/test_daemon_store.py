"""The daemon over the model store: /api/pull streams progress into the store, /api/tags lists it, a bare name
loads its only tag, /api/copy and /api/delete change it, and refused sources are 4xx."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from erllama import Runtime
from erllama.model import StubBackend
from erllama.server import ServerConfig, StoreSource, create_app
from erllama.store.store import ModelStore
from tests.unit.server.conftest import GREETING, script
from tests.unit.store.fileserver import FileServer, Served, serve_files
from tests.unit.store.test_store import gguf_bytes


@pytest.fixture
def fs() -> Iterator[FileServer]:
    with serve_files() as server:
        yield server


def test_pull_tags_chat_copy_delete(fs: FileServer, tmp_path: Path) -> None:
    body = gguf_bytes(600_000, seed=9)
    fs.files["/files/Alpha.gguf"] = Served(body, delay_per_chunk_s=0.002)
    store = ModelStore(tmp_path / "models", env={})
    rt = Runtime()
    loads: list[Path] = []

    def load(runtime: Runtime, path: Path, name: str) -> str:
        loads.append(path)
        return runtime.load_model(
            backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0, script=script), model_id=name
        )

    app = create_app(rt, {}, ServerConfig(keep_alive_s=300), source=StoreSource(store, load))

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            pull = await c.post("/api/pull", json={"model": f"{fs.url}/files/Alpha.gguf"})
            records = [json.loads(line) for line in pull.text.splitlines()]
            assert records[0] == {"status": "resolving source"}
            assert records[-1] == {"status": "success"}
            moving = [r for r in records if "completed" in r]
            assert moving[-1]["completed"] == moving[-1]["total"] == len(body)
            tags = (await c.get("/api/tags")).json()["models"]
            assert [(m["name"], m["size"], m["digest"]) for m in tags] == [
                ("alpha:latest", len(body), hashlib.sha256(body).hexdigest())
            ]
            chat = await c.post("/api/chat", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]})
            lines = [json.loads(x) for x in chat.text.splitlines()]
            assert "".join(x["message"]["content"] for x in lines) == GREETING
            assert [m["name"] for m in (await c.get("/api/ps")).json()["models"]] == ["alpha:latest"]
            assert loads == [store.get("alpha").path]
            assert (await c.post("/api/copy", json={"source": "alpha", "destination": "beta:1"})).status_code == 200
            assert [m["name"] for m in (await c.get("/api/tags")).json()["models"]] == ["alpha:latest", "beta:1"]
            assert (await c.request("DELETE", "/api/delete", json={"model": "alpha"})).status_code == 200
            assert rt.models() == [], "a deleted model is unloaded first"
            assert [e.name.name for e in store.entries()] == ["beta"]
            assert store.get("beta:1").path.is_file(), "the blob stays with its other name"
            for spec, status in (
                ("file:///etc/passwd", 400),
                (str(tmp_path / "x.gguf"), 400),  # the daemon does not read its own files for clients
                ("http://example.com/x.gguf", 400),
                ("nope-not-a-model", 404),
            ):
                r = await c.post("/api/pull", json={"model": spec})
                assert r.status_code == status, (spec, r.text)
                assert "error" in r.json()
            fs.files["/files/bad.gguf"] = Served(b"not a model")
            r = await c.post("/api/pull", json={"model": f"{fs.url}/files/bad.gguf", "stream": False})
            assert r.status_code == 502
            assert "not a GGUF file" in r.json()["error"]

    try:
        asyncio.run(go())
    finally:
        rt.close()
