"""``ModelStore``: named models as manifests over content-addressed blobs, installed atomically.

Layout under the store's root (``$ERLLAMA_HOME/models``; ``$XDG_DATA_HOME/erllama/models`` or
``~/.local/share/erllama/models`` by default)::

    manifests/<name>/<tag>.json    what a name points to: digest, size, source, license, when
    blobs/sha256-<hex>             the GGUF bytes, named by their sha256
    incoming/                      downloads in progress (``*.partial``) and their locks

A pull writes into ``incoming/``, checks the bytes (the sha256 the source promised, else the one computed, and the
GGUF magic), renames the file into ``blobs/`` and only then writes the manifest (temp file + rename + directory
fsync). So a model is visible exactly when it is whole; a killed pull leaves a partial in ``incoming/`` that the next
pull of the same source continues. Two names may point at one blob (``copy``, or the same file pulled twice): the
blob is stored once and deleted with its last manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from erllama.errors import ChecksumError, InvalidInputError, StoreError, UnknownModelError
from erllama.store.download import Retries
from erllama.store.names import ModelName
from erllama.store.sources import Source, resolve

__all__ = ["ModelEntry", "ModelStore", "PullEvent", "default_home"]

_SCHEMA = 1
_GGUF_MAGIC = b"GGUF"


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """erllama's data directory: ``$ERLLAMA_HOME``, else ``$XDG_DATA_HOME/erllama``, else ``~/.local/share/erllama``."""
    env = os.environ if env is None else env
    if env.get("ERLLAMA_HOME"):
        return Path(env["ERLLAMA_HOME"]).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "erllama"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelEntry:
    """One installed model."""

    name: ModelName
    digest: str
    """``sha256:<hex>``."""
    size: int
    path: Path
    source: str
    kind: str
    verified: bool
    """Whether the source promised the digest (catalog, the Hub, a given sha256) rather than only recorded it."""
    license: str
    created: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": str(self.name),
            "digest": self.digest,
            "size": self.size,
            "path": str(self.path),
            "source": self.source,
            "kind": self.kind,
            "verified": self.verified,
            "license": self.license,
            "created": self.created,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PullEvent:
    """Progress of a pull: ``status`` always; ``completed`` / ``total`` bytes while bytes move."""

    status: str
    digest: str | None = None
    completed: int | None = None
    total: int | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class ModelStore:
    """The model store under ``root``. Safe to use from several processes at once (file locks)."""

    def __init__(
        self, root: Path | None = None, *, env: Mapping[str, str] | None = None, retries: Retries | None = None
    ) -> None:
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.retries = retries or Retries()  # how downloads retry
        self.root = root if root is not None else default_home(self.env) / "models"
        self.manifests = self.root / "manifests"
        self.blobs = self.root / "blobs"
        self.incoming = self.root / "incoming"

    # -- reading ---------------------------------------------------------------------------------------------

    def _manifest_path(self, name: ModelName) -> Path:
        return self.manifests / name.name / f"{name.tag}.json"

    def _read(self, name: ModelName, path: Path) -> ModelEntry | None:
        try:
            data = json.loads(path.read_text())
            digest = str(data["digest"])
            blob = self.blobs / digest.replace(":", "-")
            if data.get("schema") != _SCHEMA or not blob.is_file():
                return None
            return ModelEntry(
                name=name,
                digest=digest,
                size=int(data["size"]),
                path=blob,
                source=str(data.get("source", "")),
                kind=str(data.get("kind", "")),
                verified=bool(data.get("verified", False)),
                license=str(data.get("license", "")),
                created=str(data.get("created", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable or half-written by something else: not a model

    def entries(self) -> list[ModelEntry]:
        """Every installed model, sorted by name."""
        found: list[ModelEntry] = []
        if not self.manifests.is_dir():
            return found
        for path in sorted(self.manifests.glob("*/*.json")):
            try:
                name = ModelName.parse(f"{path.parent.name}:{path.stem}")
            except InvalidInputError:
                continue
            entry = self._read(name, path)
            if entry is not None:
                found.append(entry)
        return found

    def get(self, name: str | ModelName) -> ModelEntry:
        """The installed model ``name`` (``name`` alone means ``name:latest``, or its only tag).

        Raises:
            UnknownModelError: no such model.
        """
        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
        entry = self._read(parsed, self._manifest_path(parsed))
        if entry is None and isinstance(name, str) and ":" not in name:
            tags = [e for e in self.entries() if e.name.name == parsed.name]
            if len(tags) == 1:
                entry = tags[0]
        if entry is None:
            raise UnknownModelError(f"model '{name}' not found; `erllama pull {name}` installs it")
        return entry

    # -- writing ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        self.incoming.mkdir(parents=True, exist_ok=True)
        with (self.incoming / f"{name}.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_manifest(self, name: ModelName, data: Mapping[str, Any]) -> None:
        path = self._manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def _manifest(self, entry_source: Source, digest: str, size: int) -> dict[str, Any]:
        return {
            "schema": _SCHEMA,
            "format": "gguf",
            "digest": digest,
            "size": size,
            "source": entry_source.spec,
            "kind": entry_source.kind,
            "verified": entry_source.sha256 is not None,
            "license": entry_source.license,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    def pull(
        self,
        spec: str,
        *,
        name: str | None = None,
        sha256: str | None = None,
        allow_local: bool = True,
        progress: Callable[[PullEvent], None] | None = None,
    ) -> ModelEntry:
        """Fetch ``spec`` (see ``sources.py``) and install it as ``name`` (default: the source's own name).

        Raises:
            RefusedSourceError: a source erllama does not fetch from.
            UnknownModelError: a name that is not in the catalog, or a missing local file.
            DownloadError: the transfer failed (what arrived is kept; pull again to continue).
            ChecksumError: the bytes are not what the source promised, or not a GGUF file (they are deleted).
        """
        say: Callable[[PullEvent], None] = progress or (lambda _e: None)
        target = ModelName.parse(name) if name else None  # refuse a bad name before any download
        say(PullEvent("resolving source"))
        source = resolve(spec, allow_local=allow_local, sha256=sha256, env=self.env)
        target = target or source.name
        for d in (self.manifests, self.blobs, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(f"{source.kind}\0{source.spec}".encode()).hexdigest()[:32]
        partial = self.incoming / f"{key}.partial"
        with self._lock(key):  # one download per source; a concurrent pull of it may have just finished
            if source.sha256 is not None and (self.blobs / f"sha256-{source.sha256}").is_file():
                say(PullEvent(f"already have sha256:{source.sha256[:12]}", digest=f"sha256:{source.sha256}"))
                return self._install(target, source, source.sha256, say)
            label = f"pulling {(source.sha256 or key)[:12]}"
            digest_label = f"sha256:{source.sha256}" if source.sha256 else None

            def moved(done: int, total: int | None) -> None:
                say(PullEvent(label, digest=digest_label, completed=done, total=total or source.size))

            # A killed pull of this source left its work directory behind: under this source's lock no other pull
            # of it is running, so what is there is a dead one's
            for stale in self.incoming.glob(f"work-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=self.incoming, prefix=f"work-{key}-") as work:
                source.fetch(partial, Path(work), moved, self.retries)
            say(PullEvent("verifying sha256 digest", digest=digest_label))
            try:
                with partial.open("rb") as fh:
                    magic = fh.read(4)
                got = _sha256(partial)
                source.verify(partial, got)
                if magic != _GGUF_MAGIC:
                    raise ChecksumError(f"{source.spec} is not a GGUF file (it starts with {magic!r})")
            except ChecksumError:
                partial.unlink(missing_ok=True)  # wrong bytes are never kept, not even to resume
                partial.with_name(partial.name + ".json").unlink(missing_ok=True)
                raise
            return self._install(target, source, got, say, partial)

    def _install(
        self,
        target: ModelName,
        source: Source,
        digest_hex: str,
        say: Callable[[PullEvent], None],
        partial: Path | None = None,
    ) -> ModelEntry:
        """Move the verified ``partial`` (if any) into ``blobs/`` and write the manifest, under the store lock, so a
        concurrent ``remove`` cannot collect the blob between the two."""
        blob = self.blobs / f"sha256-{digest_hex}"
        say(PullEvent("writing manifest"))
        with self._lock("store"):
            if partial is not None:
                os.replace(partial, blob)
                _fsync_dir(self.blobs)
            if not blob.is_file():
                raise StoreError(f"blob sha256:{digest_hex} vanished while installing {target}")
            self._write_manifest(target, self._manifest(source, f"sha256:{digest_hex}", blob.stat().st_size))
        say(PullEvent("success"))
        return self.get(target)

    def copy(self, source: str, destination: str) -> ModelEntry:
        """Give the model ``source`` a second name (no bytes are copied)."""
        entry = self.get(source)
        dest = ModelName.parse(destination)
        with self._lock("store"):
            data = json.loads(self._manifest_path(entry.name).read_text())
            self._write_manifest(dest, data)
        return self.get(dest)

    def remove(self, name: str) -> ModelEntry:
        """Delete the model ``name``; its blob goes with its last name.

        Raises:
            UnknownModelError: no such model.
        """
        entry = self.get(name)
        with self._lock("store"):
            self._manifest_path(entry.name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self._manifest_path(entry.name).parent.rmdir()  # only when no tag is left
            if not any(e.digest == entry.digest for e in self.entries()):
                entry.path.unlink(missing_ok=True)
        return entry
