"""JSON schema to GBNF with llama.cpp's own converter (``json_schema_to_grammar`` in libllama-common).

The converter is C++; erllama's shim (``erllama._native.shim``) exports it with a C ABI, so the grammar erllama
hands the sampler is the one llama-server would build for the same schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from erllama._native.shim import ffi, shim
from erllama.errors import SchemaError
from erllama.text import utf8

__all__ = ["json_schema_to_grammar"]


def _check_patterns(schema: object) -> None:
    """Every ``pattern`` must be a regular expression: the converter would otherwise accept any string for it."""
    stack = [schema]
    seen = 0
    while stack and seen < 100_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, Mapping):
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except (re.error, RecursionError, OverflowError) as exc:
                    raise SchemaError(f"invalid regular expression in pattern {pattern[:80]!r}: {exc}") from None
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def json_schema_to_grammar(schema: Mapping[str, Any] | bool) -> str:
    """The GBNF grammar (root rule ``root``) whose sentences are the JSON documents ``schema`` accepts.

    Raises:
        SchemaError: the schema is not JSON, or uses something the converter does not support.
        LibraryError: erllama's shim is missing (build_llama.py builds it).
    """
    _check_patterns(schema)
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
