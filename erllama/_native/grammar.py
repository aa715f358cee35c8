"""JSON schema to GBNF with llama.cpp's own converter (``json_schema_to_grammar`` in libllama-common).

The converter is C++; ``native/erllama_shim.cpp`` exports it with a C ABI and build_llama.py builds the shim beside
libllama, so the grammar erllama hands the sampler is the one llama-server would build for the same schema.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Mapping
from typing import Any

import cffi

from erllama._native.loader import library
from erllama.errors import LibraryError, SchemaError

__all__ = ["JSON_OBJECT_SCHEMA", "json_schema_to_grammar"]

# response_format {"type": "json_object"} / Ollama's format "json": any JSON object
JSON_OBJECT_SCHEMA: Mapping[str, Any] = {"type": "object"}

_ffi = cffi.FFI()
_ffi.cdef(
    """
    int erllama_json_schema_to_grammar(const char * schema_json, char ** out);
    void erllama_shim_free(char * p);
    """
)
_lock = threading.Lock()
_shim: Any = None


def _load() -> Any:
    global _shim  # noqa: PLW0603 - the process-wide handle, guarded by _lock
    with _lock:
        if _shim is None:
            lib_dir = library().lib_dir  # libllama (and its dependencies) first
            path = lib_dir / f"liberllama-shim{'.dylib' if sys.platform == 'darwin' else '.so'}"
            if not path.is_file():
                raise LibraryError(f"{path} is missing: run `python build_llama.py` to build erllama's shim")
            try:
                _shim = _ffi.dlopen(str(path))
            except OSError as exc:
                raise LibraryError(f"could not load {path}: {exc}") from exc
    return _shim


def json_schema_to_grammar(schema: Mapping[str, Any] | bool) -> str:
    """The GBNF grammar (root rule ``root``) whose sentences are the JSON documents ``schema`` accepts.

    Raises:
        SchemaError: the schema is not JSON, or uses something the converter does not support.
    """
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"the schema is not JSON: {exc}") from exc
    shim = _load()
    out = _ffi.new("char **")
    rc = shim.erllama_json_schema_to_grammar(text.encode(), out)
    try:
        message = _ffi.string(out[0]).decode("utf-8", "replace") if out[0] != _ffi.NULL else ""
    finally:
        shim.erllama_shim_free(out[0])
    if rc != 0:
        raise SchemaError(f"unsupported JSON schema: {message or 'the converter failed'}")
    return message
