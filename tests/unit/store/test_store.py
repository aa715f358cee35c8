"""The model store: names, refused sources, pulls over loopback HTTP (progress, resume, checksums, kills), the
Hub through huggingface_hub against a fake endpoint, dedup, copy and remove."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erllama.errors import (
    ChecksumError,
    DownloadError,
    InvalidInputError,
    RefusedSourceError,
    UnknownModelError,
)
from erllama.store.download import Retries
from erllama.store.names import ModelName
from erllama.store.sources import resolve
from erllama.store.store import ModelStore, PullEvent, default_home
from tests.unit.store.fileserver import FileServer, Served, serve_files

ROOT = Path(__file__).resolve().parents[3]


def gguf_bytes(n: int, seed: int = 0) -> bytes:
    """GGUF magic followed by deterministic filler (the store checks the magic and the digest, not the tensors)."""
    out = bytearray(b"GGUF")
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


@pytest.fixture
def fs() -> Iterator[FileServer]:
    with serve_files() as server:
        yield server


QUICK = Retries(backoff_s=0.001, max_wait_s=0.05)  # the tests' servers fail on purpose: retry at once


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models", env={}, retries=QUICK)


# -- names and sources ---------------------------------------------------------------------------------------


def test_names() -> None:
    assert ModelName.parse("smollm2:135m") == ModelName("smollm2", "135m")
    assert ModelName.parse("SmolLM2") == ModelName("smollm2", "latest")
    assert str(ModelName.parse("a.b_c-d")) == "a.b_c-d:latest"
    for bad in ("", ":x", "a:", "a:b:c", "../x", "a/b", "a\\b", ".hidden", "x..y", "a b", "-a", "a" * 81, "é"):
        with pytest.raises(InvalidInputError, match="invalid model name"):
            ModelName.parse(bad)


@given(st.text(max_size=40))
def test_any_accepted_name_is_one_safe_path_component(text: str) -> None:
    try:
        name = ModelName.parse(text)
    except InvalidInputError:
        return
    for part in (name.name, name.tag):
        assert "/" not in part
        assert "\\" not in part
        assert part not in (".", "..")
        assert not part.startswith(".")


def test_default_home(tmp_path: Path) -> None:
    assert default_home({"ERLLAMA_HOME": str(tmp_path)}) == tmp_path
    assert default_home({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "erllama"
    assert default_home({}) == Path.home() / ".local" / "share" / "erllama"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("file:///etc/passwd", "file:// sources are refused"),
        ("ftp://example.com/x.gguf", "ftp:// sources are refused"),
        ("s3://bucket/x.gguf", "s3:// sources are refused"),
        ("http://example.com/x.gguf", "plain http:// is refused"),
        ("https://user:pw@example.com/x.gguf", "credentials"),
        ("https://example.com/x.gguf#sha256=abc", "not a sha256"),
        ("hf://owner/repo", "use hf://owner/repo"),
        ("hf://owner/repo/../x.gguf", "not a valid repo or path component"),
        ("hf://owner/re po/x.gguf", "not a valid"),
    ],
)
def test_refused_sources(spec: str, message: str) -> None:
    with pytest.raises(RefusedSourceError, match=message):
        resolve(spec, allow_local=True)


def test_local_files_only_where_allowed(tmp_path: Path) -> None:
    f = tmp_path / "My Model.Q4.gguf"
    f.write_bytes(gguf_bytes(100))
    src = resolve(str(f), allow_local=True)
    assert src.kind == "file"
    assert src.name == ModelName("my-model.q4")
    with pytest.raises(RefusedSourceError, match="does not import local files"):
        resolve(str(f), allow_local=False)
    with pytest.raises(UnknownModelError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"), allow_local=True)


def test_unknown_catalog_name() -> None:
    with pytest.raises(UnknownModelError, match=r"not in the catalog \(known: gemma3:270m, smollm2:135m\)"):
        resolve("llama9:1t", allow_local=False)
    src = resolve("smollm2", allow_local=False)
    assert (src.kind, src.name, src.sha256) == ("catalog", ModelName("smollm2", "135m"), src.sha256)
    assert src.sha256 is not None


# -- pulls over HTTP -----------------------------------------------------------------------------------------


def test_pull_reports_progress_and_installs_atomically(fs: FileServer, store: ModelStore) -> None:
    body = gguf_bytes(300_000)
    fs.files["/m/Tiny-Model.gguf"] = Served(body)
    events: list[PullEvent] = []
    entry = store.pull(f"{fs.url}/m/Tiny-Model.gguf", progress=events.append)
    digest = hashlib.sha256(body).hexdigest()
    assert entry.name == ModelName("tiny-model")
    assert entry.digest == f"sha256:{digest}"
    assert entry.path == store.blobs / f"sha256-{digest}"
    assert entry.path.read_bytes() == body
    assert not entry.verified  # no digest was promised: recorded, not verified
    moved = [e.completed for e in events if e.completed is not None]
    assert moved == sorted(moved)
    assert moved[-1] == len(body)
    assert {e.total for e in events if e.completed is not None} == {len(body)}
    assert [e.status for e in events][-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    assert [e.name for e in store.entries()] == [ModelName("tiny-model")]
    assert not list(store.incoming.glob("*.partial"))


def test_pull_verifies_a_promised_digest(fs: FileServer, store: ModelStore) -> None:
    body = gguf_bytes(50_000)
    fs.files["/x.gguf"] = Served(body)
    good = hashlib.sha256(body).hexdigest()
    entry = store.pull(f"{fs.url}/x.gguf#sha256={good}", name="x:v1")
    assert entry.verified
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        store.pull(f"{fs.url}/x.gguf", name="x:v2", sha256="0" * 64)
    assert [str(e.name) for e in store.entries()] == ["x:v1"]
    assert not list(store.incoming.glob("*.partial")), "wrong bytes are not kept"


def test_not_a_gguf_is_refused(fs: FileServer, store: ModelStore) -> None:
    fs.files["/page.gguf"] = Served(b"<html>login required</html>")
    with pytest.raises(ChecksumError, match="not a GGUF file"):
        store.pull(f"{fs.url}/page.gguf")
    assert store.entries() == []


def test_http_errors_are_download_errors(fs: FileServer, store: ModelStore) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        store.pull(f"{fs.url}/missing.gguf")
    fs.files["/gone.gguf"] = Served(gguf_bytes(10), fail_status=410)
    with pytest.raises(DownloadError, match="HTTP 410"):
        store.pull(f"{fs.url}/gone.gguf")
    assert store.entries() == []


def test_busy_answers_are_retried(fs: FileServer, store: ModelStore) -> None:
    body = gguf_bytes(20_000, seed=12)
    fs.files["/busy.gguf"] = Served(body, fail_status=503, fail_times=2, retry_after="1")
    entry = store.pull(f"{fs.url}/busy.gguf")
    assert entry.path.read_bytes() == body
    assert len([r for r in fs.requests if r["method"] == "GET"]) == 3
    fs.files["/limited.gguf"] = Served(body, fail_status=429, fail_times=5)
    with pytest.raises(DownloadError, match="failed 4 times in a row"):
        store.pull(f"{fs.url}/limited.gguf", name="limited")


def test_a_dropped_connection_resumes_with_a_range_request(fs: FileServer, store: ModelStore) -> None:
    body = gguf_bytes(400_000, seed=1)
    fs.files["/big.gguf"] = Served(body, drop_after=150_000, drops=2)
    entry = store.pull(f"{fs.url}/big.gguf")
    assert entry.path.read_bytes() == body
    gets = [r for r in fs.requests if r["method"] == "GET"]
    assert len(gets) == 3
    ranges = [r["headers"].get("range") for r in gets]
    assert ranges == [None, "bytes=150000-", "bytes=300000-"]
    assert all(r["headers"].get("if-range") == '"v1"' for r in gets[1:])


def test_a_failed_pull_keeps_its_bytes_and_the_next_pull_continues(fs: FileServer, store: ModelStore) -> None:
    body = gguf_bytes(200_000, seed=2)
    served = Served(body, drop_after=80_000, drops=1)
    fs.files["/m.gguf"] = served
    url = f"{fs.url}/m.gguf"

    def down_after_first(event: PullEvent) -> None:  # the first GET drops mid-body, the retries find it down
        if event.completed and event.completed >= 80_000:
            served.fail_status = 503

    with pytest.raises(DownloadError):
        store.pull(url, progress=down_after_first)
    assert store.entries() == [], "nothing is visible"
    partials = list(store.incoming.glob("*.partial"))
    assert len(partials) == 1
    assert partials[0].stat().st_size == 80_000
    served.fail_status = None
    fs.requests.clear()
    entry = store.pull(url)
    assert entry.path.read_bytes() == body
    assert fs.requests[0]["headers"].get("range") == "bytes=80000-"


def test_a_changed_file_is_fetched_again_from_the_start(fs: FileServer, store: ModelStore) -> None:
    old, new = gguf_bytes(100_000, seed=3), gguf_bytes(120_000, seed=4)
    served = Served(old, drop_after=30_000, drops=1)
    fs.files["/m.gguf"] = served

    def replace(event: PullEvent) -> None:
        if event.completed == 30_000:
            served.body, served.etag = new, '"v2"'  # changed on the server between the drop and the retry

    entry = store.pull(f"{fs.url}/m.gguf", progress=replace)
    assert entry.path.read_bytes() == new  # If-Range did not match: a whole new body, not a spliced one


def test_kill_during_download_leaves_no_model_and_the_next_pull_resumes(fs: FileServer, tmp_path: Path) -> None:
    body = gguf_bytes(2_000_000, seed=5)
    fs.files["/slow.gguf"] = Served(body, delay_per_chunk_s=0.01)
    root = tmp_path / "models"
    code = (
        "import sys; from pathlib import Path; from erllama.store.store import ModelStore; "
        "ModelStore(Path(sys.argv[1]), env={}).pull(sys.argv[2])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), f"{fs.url}/slow.gguf"], cwd=ROOT)
    store = ModelStore(root, env={}, retries=QUICK)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        partials = list(store.incoming.glob("*.partial")) if store.incoming.is_dir() else []
        if partials and partials[0].stat().st_size > 200_000:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.entries() == []
    assert not list(store.blobs.glob("*")) if store.blobs.is_dir() else True
    kept = next(store.incoming.glob("*.partial")).stat().st_size
    assert 0 < kept < len(body)
    assert list(store.incoming.glob("work-*")), "the killed pull left its work directory"
    fs.files["/slow.gguf"].delay_per_chunk_s = 0
    fs.requests.clear()
    entry = store.pull(f"{fs.url}/slow.gguf")
    assert entry.path.read_bytes() == body
    assert fs.requests[0]["headers"].get("range") == f"bytes={kept}-"
    assert not list(store.incoming.glob("work-*")), "the next pull of the source removed it"


def test_dedup_copy_and_remove(fs: FileServer, store: ModelStore) -> None:
    body = gguf_bytes(10_000, seed=6)
    fs.files["/a.gguf"] = Served(body)
    digest = hashlib.sha256(body).hexdigest()
    a = store.pull(f"{fs.url}/a.gguf", name="a")
    events: list[PullEvent] = []
    b = store.pull(f"{fs.url}/a.gguf#sha256={digest}", name="b:v1", progress=events.append)
    assert any(e.status.startswith("already have") for e in events)
    c = store.copy("a", "c:copy")
    assert a.path == b.path == c.path
    assert len(list(store.blobs.iterdir())) == 1
    assert [str(e.name) for e in store.entries()] == ["a:latest", "b:v1", "c:copy"]
    store.remove("a")
    store.remove("b:v1")
    assert c.path.is_file(), "a blob stays while a name points at it"
    store.remove("c:copy")
    assert not c.path.exists()
    assert store.entries() == []
    with pytest.raises(UnknownModelError, match="not found"):
        store.remove("a")
    with pytest.raises(UnknownModelError):
        store.copy("missing", "x")


def test_get_by_bare_name_finds_its_only_tag(fs: FileServer, store: ModelStore) -> None:
    fs.files["/a.gguf"] = Served(gguf_bytes(1000))
    store.pull(f"{fs.url}/a.gguf", name="solo:7b")
    assert store.get("solo").name == ModelName("solo", "7b")
    store.copy("solo:7b", "solo:8b")
    with pytest.raises(UnknownModelError):
        store.get("solo")  # two tags: ambiguous


def test_a_corrupt_manifest_is_not_a_model(fs: FileServer, store: ModelStore) -> None:
    fs.files["/a.gguf"] = Served(gguf_bytes(1000))
    entry = store.pull(f"{fs.url}/a.gguf", name="a")
    (store.manifests / "a" / "latest.json").write_text("{not json")
    assert store.entries() == []
    (store.manifests / "a" / "latest.json").write_text(json.dumps({"schema": 1, "digest": "sha256:00", "size": 1}))
    assert store.entries() == [], "a manifest whose blob is missing is not a model"
    assert entry.path.is_file()


def test_local_import(tmp_path: Path, store: ModelStore) -> None:
    f = tmp_path / "Local.gguf"
    f.write_bytes(gguf_bytes(5000))
    entry = store.pull(str(f))
    assert entry.name == ModelName("local")
    assert entry.kind == "file"
    assert entry.path.read_bytes() == f.read_bytes()
    assert f.exists(), "the original stays where it was"


# -- the Hub, through huggingface_hub --------------------------------------------------------------------------


def _hub_file(fs: FileServer, repo: str, path: str, body: bytes, *, lfs: bool = True) -> None:
    fs.files[f"/hub/{repo}/{path}"] = Served(body)
    info: dict[str, object] = {"type": "file", "path": path, "size": len(body), "oid": "0" * 40}
    if lfs:
        info["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
    else:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % len(body) + body)
        info["oid"] = h.hexdigest()
    fs.hub.setdefault(repo, {})[path] = info


def test_hf_pull_through_huggingface_hub(fs: FileServer, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", env={"HF_ENDPOINT": fs.url}, retries=QUICK)
    body = gguf_bytes(70_000, seed=7)
    _hub_file(fs, "someone/Some-GGUF", "Some-Model-Q4_K_M.gguf", body)
    _hub_file(fs, "someone/Some-GGUF", "small/plain.gguf", gguf_bytes(900, seed=8), lfs=False)
    entry = store.pull("hf://someone/Some-GGUF/Some-Model-Q4_K_M.gguf")
    assert entry.name == ModelName("some-model-q4_k_m")
    assert entry.verified
    assert entry.kind == "hf"
    assert entry.source == "hf://someone/Some-GGUF/Some-Model-Q4_K_M.gguf"
    assert entry.path.read_bytes() == body
    posts = [r for r in fs.requests if r["method"] == "POST"]
    assert posts[0]["path"] == "/api/models/someone/Some-GGUF/paths-info/main"
    assert store.pull("hf://someone/Some-GGUF@main/small/plain.gguf", name="plain").size == 900
    # the Hub promised another digest than the bytes it sent
    fs.hub["someone/Some-GGUF"]["Some-Model-Q4_K_M.gguf"]["lfs"]["oid"] = "1" * 64
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        store.pull("hf://someone/Some-GGUF/Some-Model-Q4_K_M.gguf", name="other")
    with pytest.raises(UnknownModelError, match="no such file"):
        store.pull("hf://someone/Some-GGUF/absent.gguf")
    with pytest.raises(DownloadError, match="Hub answered"):
        store.pull("hf://nobody/nothing/x.gguf")
