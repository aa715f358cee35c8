"""Response schemas the dialects share (pure values; the grammar for a schema comes from the native converter)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["JSON_OBJECT_SCHEMA"]

# response_format {"type": "json_object"} / Ollama's format "json": any JSON object
JSON_OBJECT_SCHEMA: Mapping[str, Any] = {"type": "object"}
