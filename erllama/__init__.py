"""erllama: a Python runtime for llama.cpp that keeps prompt prefixes warm.

The native binding lives in :mod:`erllama._native`; errors in :mod:`erllama.errors`.
"""

from erllama.errors import ErllamaError

__version__ = "0.1.0"

__all__ = ["ErllamaError", "__version__"]
