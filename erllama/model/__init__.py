"""Models: the backend protocol and its two implementations (llama.cpp and a deterministic stub).

``ModelWorker`` serves one backend from one thread with continuous batching. The supervisor, registry, cache
admission and public API arrive with the rest of the runtime.
"""

from erllama.model.backend import BackendInfo, DecodeItem, ModelBackend, SamplerConfig
from erllama.model.llama import LlamaBackend, kv_layout_params
from erllama.model.registry import Registry
from erllama.model.stop import StopMatcher, first_stop
from erllama.model.stub import StubBackend
from erllama.model.supervisor import ModelStatus, Supervisor
from erllama.model.worker import (
    DoneEvent,
    ErrorEvent,
    Event,
    FinishReason,
    ModelWorker,
    Phase,
    RequestHandle,
    TokenEvent,
)

__all__ = [
    "BackendInfo",
    "DecodeItem",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "FinishReason",
    "LlamaBackend",
    "ModelBackend",
    "ModelStatus",
    "ModelWorker",
    "Phase",
    "Registry",
    "RequestHandle",
    "SamplerConfig",
    "StopMatcher",
    "StubBackend",
    "Supervisor",
    "TokenEvent",
    "first_stop",
    "kv_layout_params",
]
