"""The Ray Serve application: an :class:`~erllama.cluster.ingress.Ingress` in front of a ``ModelReplica``
deployment routed by :class:`~erllama.cluster.router.PrefixRouter` (or Ray's default router, to compare).

Started by ``erllama cluster serve``, or by Ray's own tools from a config file::

    applications:
      - name: erllama
        route_prefix: /
        import_path: erllama.cluster:app_builder
        args: {model: smollm2, replicas: 2, kv_dir: /mnt/shared/kv}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from erllama.cluster.config import ClusterConfig
from erllama.cluster.ingress import Ingress
from erllama.cluster.replica import ModelReplica

__all__ = ["app_builder", "build", "replica_options"]


def build(config: ClusterConfig) -> Application:
    """The application for ``config``."""
    model: Any = serve.deployment(ModelReplica)  # Ray's decorators are typed loosely
    ingress: Any = Ingress
    return cast(Application, ingress.bind(model.options(**replica_options(config)).bind(config), config))


def replica_options(config: ClusterConfig) -> dict[str, Any]:
    """The model deployment's Ray Serve options for ``config``."""
    options: dict[str, Any] = {
        "name": "ModelReplica",
        "max_ongoing_requests": config.max_ongoing,
        "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 60.0,
    }
    if config.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = config.max_replicas_per_node
    if config.autoscale is not None:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=config.autoscale[0],
            max_replicas=config.autoscale[1],
            target_ongoing_requests=config.target_ongoing,
        )
    else:
        options["num_replicas"] = config.replicas
    if config.router == "prefix":
        options["request_router_config"] = RequestRouterConfig.model_validate(
            {
                "request_router_class": "erllama.cluster.router:PrefixRouter",
                "request_router_kwargs": {
                    "tokens_per_request": config.tokens_per_request,
                    "imbalance": config.imbalance,
                },
                "request_routing_stats_period_s": config.stats_period_s,
                "request_routing_stats_timeout_s": max(5.0, 5 * config.stats_period_s),
            }
        )
    return options


def app_builder(args: Mapping[str, Any]) -> Application:
    """``import_path: erllama.cluster:app_builder`` in a Serve config file; ``args`` are :class:`ClusterConfig`'s
    fields."""
    return build(ClusterConfig.from_args(args))
