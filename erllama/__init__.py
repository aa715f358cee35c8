"""erllama: a Python runtime for llama.cpp that keeps prompt prefixes warm.

The public API is :class:`Runtime` (:mod:`erllama.runtime`) and the module-level functions that call a process-wide
default runtime (``erllama.load_model``, ``erllama.complete``, ... from :mod:`erllama.api`). The cache lives in
:mod:`erllama.cache`, models and workers in :mod:`erllama.model`, the native binding in :mod:`erllama._native`,
errors in :mod:`erllama.errors`.

The API names are imported on first use, so the pure-Python packages (``erllama.cache``, ``erllama.pressure``)
import without the native library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from erllama.errors import ErllamaError

if TYPE_CHECKING:
    from erllama.api import (
        apply_chat_template,
        cancel,
        complete,
        counters,
        default_runtime,
        detokenize,
        draft_tokens,
        embed,
        evict,
        infer,
        last_cache_hit,
        list_adapters,
        list_cached_prefixes,
        list_models,
        load_adapter,
        load_model,
        model_info,
        models,
        pending_len,
        phase,
        prefill_only,
        queue_depth,
        set_adapter_scale,
        shutdown,
        status,
        tokenize,
        unload,
        unload_adapter,
        unload_model,
        verify,
        vram_info,
    )
    from erllama.runtime import (
        AdapterInfo,
        Completion,
        Failed,
        Finished,
        ModelSummary,
        Runtime,
        Started,
        Stats,
        Stream,
        StreamEvent,
        TextDelta,
        ThinkingDelta,
        TokenLogprob,
        VramInfo,
    )

__version__ = "0.1.0"

__all__ = [
    "AdapterInfo",
    "Completion",
    "ErllamaError",
    "Failed",
    "Finished",
    "ModelSummary",
    "Runtime",
    "Started",
    "Stats",
    "Stream",
    "StreamEvent",
    "TextDelta",
    "ThinkingDelta",
    "TokenLogprob",
    "VramInfo",
    "__version__",
    "apply_chat_template",
    "cancel",
    "complete",
    "counters",
    "default_runtime",
    "detokenize",
    "draft_tokens",
    "embed",
    "evict",
    "infer",
    "last_cache_hit",
    "list_adapters",
    "list_cached_prefixes",
    "list_models",
    "load_adapter",
    "load_model",
    "model_info",
    "models",
    "pending_len",
    "phase",
    "prefill_only",
    "queue_depth",
    "set_adapter_scale",
    "shutdown",
    "status",
    "tokenize",
    "unload",
    "unload_adapter",
    "unload_model",
    "verify",
    "vram_info",
]


def __getattr__(name: str) -> Any:
    # The API names come from erllama.api (functions) and erllama.runtime (types), imported on first use.
    if name not in __all__ or name in {"ErllamaError", "__version__"}:
        raise AttributeError(f"module 'erllama' has no attribute {name!r}")
    api = importlib.import_module("erllama.api")
    value = getattr(api, name) if hasattr(api, name) else getattr(importlib.import_module("erllama.runtime"), name)
    globals()[name] = value
    return value
