"""The model store: named models (``name:tag``) as manifests over content-addressed, sha256-verified blobs.

``names`` (the name grammar), ``sources`` (catalog, hf://, https://, local files, and what is refused), ``download``
(resumable HTTP), ``catalog`` (models packaged in PyPI wheels), ``store`` (layout, atomic installs), ``info`` (what
``show`` reads from a GGUF header).
"""

from erllama.store.download import Retries
from erllama.store.names import ModelName
from erllama.store.store import ModelEntry, ModelStore, PullEvent, default_home

__all__ = ["ModelEntry", "ModelName", "ModelStore", "PullEvent", "Retries", "default_home"]
