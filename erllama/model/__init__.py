"""Models: the backend protocol and its two implementations (llama.cpp and a deterministic stub).

The worker, supervisor, registry and public API arrive with the runtime.
"""

from erllama.model.backend import BackendInfo, DecodeItem, ModelBackend, SamplerConfig
from erllama.model.llama import LlamaBackend, kv_layout_params
from erllama.model.stub import StubBackend

__all__ = [
    "BackendInfo",
    "DecodeItem",
    "LlamaBackend",
    "ModelBackend",
    "SamplerConfig",
    "StubBackend",
    "kv_layout_params",
]
