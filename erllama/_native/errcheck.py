"""The last error llama.cpp logged on this thread, so exceptions can say why a C call failed.

llama.cpp reports most failures (a NULL model, a refused state blob) only through its log. The log callback files
every warning and error here, per thread; a wrapper clears the slot before a call and reads it after a failure.
"""

from __future__ import annotations

import threading

__all__ = ["clear_last_error", "last_error", "record"]

_local = threading.local()


def record(message: str) -> None:
    """Remember a warning or error line logged by llama.cpp on this thread."""
    lines: list[str] = getattr(_local, "lines", [])
    lines.append(message.strip())
    _local.lines = lines[-4:]


def clear_last_error() -> None:
    _local.lines = []


def last_error(default: str) -> str:
    """The error lines logged on this thread since the last clear, joined, or ``default``."""
    lines: list[str] = getattr(_local, "lines", [])
    return "; ".join(line for line in lines if line) or default
