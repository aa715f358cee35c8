"""The inference daemon: the OpenAI, Anthropic and Ollama HTTP dialects over one runtime.

``create_app`` builds the ASGI app; ``python -m erllama serve`` runs it on uvicorn, bound to 127.0.0.1 by default.
``StoreSource`` (the model store) is the model source of ``serve``; ``ModelDirectory`` serves a plain directory.
"""

from erllama.server.app import create_app
from erllama.server.models import ModelDirectory, StoreSource
from erllama.server.state import ManagedSource, ModelSource, ServerConfig, ServerState

__all__ = ["ManagedSource", "ModelDirectory", "ModelSource", "ServerConfig", "ServerState", "StoreSource", "create_app"]
