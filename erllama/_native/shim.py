"""erllama's own C shim (``native/erllama_shim.cpp``), built by build_llama.py beside libllama.

It exports, with a C ABI, the few things libllama's C API lacks: llama.cpp's JSON-schema-to-grammar converter
(C++, in libllama-common) and the x87 state hygiene described in docs/runtime.md ("x87 state and ggml's speed").
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import cffi

from erllama._native.loader import library
from erllama.errors import LibraryError

__all__ = ["ffi", "shim", "x87_in_use", "x87_resetter"]

ffi = cffi.FFI()
ffi.cdef(
    """
    int erllama_json_schema_to_grammar(const char * schema_json, char ** out);
    void erllama_shim_free(char * p);
    int erllama_x87_in_use(void);
    int erllama_x87_reset(void);
    """
)
_lock = threading.Lock()
_shim: Any = None


def shim() -> Any:
    """The shim's cffi library object, opened once per process (after libllama, whose symbols it uses).

    Raises:
        LibraryError: the shim is missing or cannot be loaded.
    """
    global _shim  # noqa: PLW0603 - the process-wide handle, guarded by _lock
    with _lock:
        if _shim is None:
            lib_dir = library().lib_dir
            path = lib_dir / f"liberllama-shim{'.dylib' if sys.platform == 'darwin' else '.so'}"
            if not path.is_file():
                raise LibraryError(f"{path} is missing: run `python build_llama.py` to build erllama's shim")
            try:
                _shim = ffi.dlopen(str(path))
            except OSError as exc:
                raise LibraryError(f"could not load {path}: {exc}") from exc
    return _shim


def x87_in_use() -> bool | None:
    """Whether the calling thread's x87 state is in use; None where the CPU cannot tell (or no shim)."""
    try:
        state = int(shim().erllama_x87_in_use())
    except LibraryError:
        return None
    return None if state < 0 else bool(state)


def _noop() -> int:
    return -1


def x87_resetter() -> Callable[[], int]:
    """The function that puts the calling thread's x87 state back in its initial configuration.

    It returns 1 when it reset the state, 0 when it was already initial, -1 when it left it alone. Without the
    shim it is a no-op: the reset only buys speed, never correctness.
    """
    try:
        return shim().erllama_x87_reset  # type: ignore[no-any-return]
    except LibraryError:
        return _noop
