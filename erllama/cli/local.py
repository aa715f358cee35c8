"""What ``run`` and ``serve`` share on this machine: where the KV cache's disk tier lives, and how a model argument
(a GGUF path, a store name, or a catalog name not installed yet) becomes a file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from erllama.cli.output import Output
from erllama.errors import InvalidInputError, UnknownModelError
from erllama.store.store import ModelStore

__all__ = ["default_kv_dir", "in_catalog", "model_file"]


def default_kv_dir(env: Mapping[str, str]) -> Path:
    """The disk tier's directory: ``$ERLLAMA_CACHE_DIR/kv`` (default ``~/.cache/erllama/kv``)."""
    return Path(env.get("ERLLAMA_CACHE_DIR") or Path.home() / ".cache" / "erllama") / "kv"


def in_catalog(model: str) -> bool:
    from erllama.store.catalog import lookup
    from erllama.store.names import ModelName

    try:
        return lookup(str(ModelName.parse(model))) is not None
    except InvalidInputError:
        return False


def model_file(model: str, store: ModelStore, out: Output) -> tuple[str, Path]:
    """The model's name and file: a GGUF path as given, an installed model, or a catalog model pulled now."""
    if model.endswith(".gguf") or os.sep in model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise UnknownModelError(f"{model}: no such file")
        return path.stem, path
    try:
        entry = store.get(model)
    except UnknownModelError:
        if not in_catalog(model):
            raise
        out.note(f"pulling {model}")
        with out.pull_progress() as progress:
            entry = store.pull(model, progress=progress)
    return str(entry.name), entry.path
