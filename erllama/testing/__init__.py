"""Test models: a tiny generated llama model and real small models shipped in PyPI packages."""

from erllama.testing.fetch import SMOLLM2, FetchError, PackagedModel, fetch, models_dir
from erllama.testing.tiny import TinyModelSpec, spm_vocab, tiny_model, write_tiny_lora, write_tiny_model

__all__ = [
    "SMOLLM2",
    "FetchError",
    "PackagedModel",
    "TinyModelSpec",
    "fetch",
    "models_dir",
    "spm_vocab",
    "tiny_model",
    "write_tiny_lora",
    "write_tiny_model",
]
