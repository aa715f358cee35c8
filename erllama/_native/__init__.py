"""The cffi ABI-mode binding to libllama: the only package of erllama that touches cffi.

``loader`` finds and opens the library once per process; ``Model``, ``Context``, ``Batch`` and ``Sampler`` each own
one llama.cpp object and free it deterministically in ``close()``. The values they take (``SamplerConfig``, the
text helpers) are pure Python, in :mod:`erllama.sampling` and :mod:`erllama.text`.
"""

from erllama._native.batch import Batch
from erllama._native.context import Context
from erllama._native.grammar import json_schema_to_grammar
from erllama._native.loader import CpuVariant, GpuDevice, Library, abi_mismatches, cpu_variants, library, loaded_library
from erllama._native.model import LoraAdapter, Model, ModelConfig, ModelInfo
from erllama._native.params import ContextConfig, FlashAttention, KVType
from erllama._native.sampler import Sampler, sample_rows
from erllama._native.selfcheck import SmokeSpec, Verdict, prove_build, prove_variant

__all__ = [
    "Batch",
    "Context",
    "ContextConfig",
    "CpuVariant",
    "FlashAttention",
    "GpuDevice",
    "KVType",
    "Library",
    "LoraAdapter",
    "Model",
    "ModelConfig",
    "ModelInfo",
    "Sampler",
    "SmokeSpec",
    "Verdict",
    "abi_mismatches",
    "cpu_variants",
    "json_schema_to_grammar",
    "library",
    "loaded_library",
    "prove_build",
    "prove_variant",
    "sample_rows",
]
