"""erllama on a Ray Serve cluster (``pip install 'erllama[cluster]'``): replicas each hosting one runtime and the
HTTP app of ``erllama serve``, an ingress that finds each prompt's tokens, and a router that sends each request
to the replica whose cache holds the longest token-exact prefix of it. See docs/cluster.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from erllama.cluster.config import ClusterConfig

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["ClusterConfig", "app_builder", "build"]


def build(config: ClusterConfig) -> Application:
    from erllama.cluster.app import build as _build

    return _build(config)


def app_builder(args: dict[str, Any]) -> Application:
    from erllama.cluster.app import app_builder as _builder

    return _builder(args)
