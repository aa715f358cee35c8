"""The module-level API: ``erllama.load_model(...)``, ``erllama.complete(...)`` and friends.

Each function calls the method of the same name on one process-wide :class:`~erllama.runtime.Runtime`, created on
first use (a RAM cache tier of ``DEFAULT_RAM_CACHE_BYTES``). Use a ``Runtime`` of your own to choose its cache tiers
and policy, or to run several side by side.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from erllama.runtime import Runtime

__all__ = [
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

_lock = threading.Lock()
_runtime: list[Runtime] = []
_P = ParamSpec("_P")
_R = TypeVar("_R")


def default_runtime() -> Runtime:
    """The process-wide runtime behind the module-level functions."""
    with _lock:
        if not _runtime:
            _runtime.append(Runtime())
        return _runtime[0]


def _delegate(method: Callable[Concatenate[Runtime, _P], _R]) -> Callable[_P, _R]:
    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return method(default_runtime(), *args, **kwargs)

    sig = inspect.signature(method)
    call.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
    return call


load_model = _delegate(Runtime.load_model)
unload = _delegate(Runtime.unload)
unload_model = _delegate(Runtime.unload_model)
complete = _delegate(Runtime.complete)
infer = _delegate(Runtime.infer)
cancel = _delegate(Runtime.cancel)
prefill_only = _delegate(Runtime.prefill_only)
tokenize = _delegate(Runtime.tokenize)
detokenize = _delegate(Runtime.detokenize)
apply_chat_template = _delegate(Runtime.apply_chat_template)
embed = _delegate(Runtime.embed)
evict = _delegate(Runtime.evict)
shutdown = _delegate(Runtime.shutdown)
list_models = _delegate(Runtime.list_models)
models = _delegate(Runtime.models)
model_info = _delegate(Runtime.model_info)
phase = _delegate(Runtime.phase)
status = _delegate(Runtime.status)
pending_len = _delegate(Runtime.pending_len)
queue_depth = _delegate(Runtime.queue_depth)
last_cache_hit = _delegate(Runtime.last_cache_hit)
list_cached_prefixes = _delegate(Runtime.list_cached_prefixes)
counters = _delegate(Runtime.counters)
load_adapter = _delegate(Runtime.load_adapter)
set_adapter_scale = _delegate(Runtime.set_adapter_scale)
unload_adapter = _delegate(Runtime.unload_adapter)
list_adapters = _delegate(Runtime.list_adapters)
draft_tokens = _delegate(Runtime.draft_tokens)
verify = _delegate(Runtime.verify)
vram_info = Runtime.vram_info
