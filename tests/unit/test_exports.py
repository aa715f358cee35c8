"""Public names: each package re-exports a sorted, complete __all__."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = {
    "erllama._native": ["batch", "context", "loader", "model", "params", "sampler"],
    "erllama.testing": ["fetch", "serving", "tiny"],
    "erllama.cache": ["counters", "filetier", "index", "key", "policy", "store", "tier", "writer"],
    "erllama.pressure": ["sampler", "scheduler"],
    "erllama.model": [
        "backend",
        "batching",
        "cachelink",
        "config",
        "delivery",
        "events",
        "llama",
        "planner",
        "registry",
        "request",
        "speculative",
        "stop",
        "stub",
        "supervisor",
        "think",
        "worker",
    ],  # admission, apply, sequences: internal
    "erllama": ["api", "runtime", "stream"],
    "erllama.server": ["anthropic", "app", "models", "ollama", "openai", "state"],  # chat, metrics: internal
    "erllama.chat": ["engine", "schema", "template", "tools", "types"],
    "erllama.cluster": ["config"],  # app, bridge, ingress, placement, prompts, replica, router: by their modules
}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_all_is_sorted_and_complete(package: str) -> None:
    pkg = importlib.import_module(package)
    exported = list(pkg.__all__)
    # isort order, as ruff keeps it: CONSTANTS, then Classes, then functions
    assert exported == sorted(exported, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    for name in exported:
        assert hasattr(pkg, name), name
    for module_name in PACKAGES[package]:
        module = importlib.import_module(f"{package}.{module_name}")
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert name in exported or name in {"lib", "ffi", "library_dir", "PieceSource"}, (
                    f"{package}.{module_name}.{name} is public but not re-exported"
                )
