"""A Serve config file's ``args`` build the application (``import_path: erllama.cluster:app_builder``), and what
cannot be right is refused before Ray starts anything."""

from __future__ import annotations

import pytest

from erllama.cluster import ClusterConfig, app_builder
from erllama.errors import InvalidInputError


def test_args_of_a_config_file_build_the_application() -> None:
    from ray.serve import Application

    app = app_builder({"model": "smollm2", "replicas": 3, "kv_dir": "/mnt/kv", "autoscale": [1, 4]})
    assert isinstance(app, Application)


def test_the_router_and_the_replicas_follow_the_config() -> None:
    from erllama.cluster.app import replica_options

    ours = replica_options(ClusterConfig.from_args({"model": "smollm2", "replicas": 3, "max_replicas_per_node": 1}))
    assert ours["num_replicas"] == 3
    assert ours["max_replicas_per_node"] == 1
    assert ours["request_router_config"].request_router_class == "erllama.cluster.router:PrefixRouter"
    kwargs = ours["request_router_config"].request_router_kwargs
    assert kwargs == {"tokens_per_request": 64, "imbalance": 8}
    default = replica_options(ClusterConfig(model="smollm2", router="default"))
    assert "request_router_config" not in default, "Ray's own router"
    scaled = replica_options(ClusterConfig(model="smollm2", autoscale=(1, 4)))
    assert "num_replicas" not in scaled
    assert (scaled["autoscaling_config"].min_replicas, scaled["autoscaling_config"].max_replicas) == (1, 4)


def test_what_cannot_be_right_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="unknown cluster settings: replica"):
        ClusterConfig.from_args({"model": "m", "replica": 2})
    with pytest.raises(InvalidInputError, match="at least one replica"):
        ClusterConfig(model="m", replicas=0)
    with pytest.raises(InvalidInputError, match="router"):
        ClusterConfig(model="m", router="round_robin")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="autoscale"):
        ClusterConfig.from_args({"model": "m", "autoscale": [3, 1]})
