"""JSON schema to GBNF with llama.cpp's own converter (``json_schema_to_grammar`` in libllama-common).

The converter is C++; erllama's shim (``erllama._native.shim``) exports it with a C ABI, so the grammar erllama
hands the sampler is the one llama-server would build for the same schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from erllama._native.shim import ffi, shim
from erllama._native.text import utf8
from erllama.errors import SchemaError

__all__ = ["JSON_OBJECT_SCHEMA", "json_schema_to_grammar"]

# response_format {"type": "json_object"} / Ollama's format "json": any JSON object
JSON_OBJECT_SCHEMA: Mapping[str, Any] = {"type": "object"}


def json_schema_to_grammar(schema: Mapping[str, Any] | bool) -> str:
    """The GBNF grammar (root rule ``root``) whose sentences are the JSON documents ``schema`` accepts.

    Raises:
        SchemaError: the schema is not JSON, or uses something the converter does not support.
        LibraryError: erllama's shim is missing (build_llama.py builds it).
    """
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"the schema is not JSON: {exc}") from exc
    lib = shim()
    out = ffi.new("char **")
    rc = lib.erllama_json_schema_to_grammar(utf8(text, "the schema"), out)
    try:
        message = ffi.string(out[0]).decode("utf-8", "replace") if out[0] != ffi.NULL else ""
    finally:
        lib.erllama_shim_free(out[0])
    if rc != 0:
        raise SchemaError(f"unsupported JSON schema: {message or 'the converter failed'}")
    return message
