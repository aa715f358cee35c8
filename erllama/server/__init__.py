"""The inference daemon: OpenAI (and, next, Anthropic and Ollama) HTTP dialects over one runtime.

``create_app`` builds the ASGI app; ``python -m erllama serve`` runs it on uvicorn, bound to 127.0.0.1 by default.
"""

from erllama.server.app import create_app
from erllama.server.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "ServerState", "create_app"]
