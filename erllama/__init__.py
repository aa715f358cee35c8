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
        Stats,
        Stream,
        StreamEvent,
        TextDelta,
        ThinkingDelta,
        VramInfo,
    )

__version__ = "0.1.0"

_LAZY = {
    "AdapterInfo": "erllama.runtime",
    "Failed": "erllama.runtime",
    "Finished": "erllama.runtime",
    "ModelSummary": "erllama.runtime",
    "VramInfo": "erllama.runtime",
    "apply_chat_template": "erllama.api",
    "cancel": "erllama.api",
    "complete": "erllama.api",
    "counters": "erllama.api",
    "default_runtime": "erllama.api",
    "detokenize": "erllama.api",
    "draft_tokens": "erllama.api",
    "embed": "erllama.api",
    "evict": "erllama.api",
    "infer": "erllama.api",
    "last_cache_hit": "erllama.api",
    "list_adapters": "erllama.api",
    "list_cached_prefixes": "erllama.api",
    "list_models": "erllama.api",
    "load_adapter": "erllama.api",
    "load_model": "erllama.api",
    "model_info": "erllama.api",
    "models": "erllama.api",
    "pending_len": "erllama.api",
    "phase": "erllama.api",
    "prefill_only": "erllama.api",
    "queue_depth": "erllama.api",
    "set_adapter_scale": "erllama.api",
    "shutdown": "erllama.api",
    "status": "erllama.api",
    "tokenize": "erllama.api",
    "unload": "erllama.api",
    "unload_adapter": "erllama.api",
    "unload_model": "erllama.api",
    "verify": "erllama.api",
    "vram_info": "erllama.api",
    "Completion": "erllama.runtime",
    "Runtime": "erllama.runtime",
    "Stats": "erllama.runtime",
    "Stream": "erllama.runtime",
    "StreamEvent": "erllama.runtime",
    "TextDelta": "erllama.runtime",
    "ThinkingDelta": "erllama.runtime",
}

__all__ = [
    "AdapterInfo",
    "Completion",
    "ErllamaError",
    "Failed",
    "Finished",
    "ModelSummary",
    "Runtime",
    "Stats",
    "Stream",
    "StreamEvent",
    "TextDelta",
    "ThinkingDelta",
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
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'erllama' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
