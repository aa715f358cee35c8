"""The cffi ABI-mode binding to libllama: the only package of erllama that touches cffi.

``loader`` finds and opens the library once per process; ``Model``, ``Context``, ``Batch`` and ``Sampler`` each own
one llama.cpp object and free it deterministically in ``close()``; ``Detokenizer`` streams text safely.
"""

from erllama._native.batch import Batch
from erllama._native.context import Context, ContextConfig, FlashAttention, KVType
from erllama._native.grammar import JSON_OBJECT_SCHEMA, json_schema_to_grammar
from erllama._native.loader import CpuVariant, GpuDevice, Library, abi_mismatches, cpu_variants, library, loaded_library
from erllama._native.model import LoraAdapter, Model, ModelConfig, ModelInfo
from erllama._native.sampler import DEFAULT_SEED, Sampler, SamplerConfig, sample_rows
from erllama._native.selfcheck import SmokeSpec, Verdict, prove_build, prove_variant
from erllama._native.text import Detokenizer, utf8

__all__ = [
    "DEFAULT_SEED",
    "JSON_OBJECT_SCHEMA",
    "Batch",
    "Context",
    "ContextConfig",
    "CpuVariant",
    "Detokenizer",
    "FlashAttention",
    "GpuDevice",
    "KVType",
    "Library",
    "LoraAdapter",
    "Model",
    "ModelConfig",
    "ModelInfo",
    "Sampler",
    "SamplerConfig",
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
    "utf8",
]
