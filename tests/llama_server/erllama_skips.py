"""A pytest plugin for llama.cpp's server test suite run against erllama (``scripts/llama-server-suite``): skips
the tests listed in ``$ERLLAMA_SUITE_SKIPS`` (a TOML file of ``[[skip]]`` entries: a test file, a test with all its
parameter sets, one parameter set, or with a trailing ``*`` a node-id prefix; and the reason the test cannot
apply), and fails the run when an entry matches no test (a stale list hides nothing)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

_ENTRIES: list[dict[str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get("ERLLAMA_SUITE_SKIPS")
    if path:
        _ENTRIES.extend(tomllib.loads(Path(path).read_text()).get("skip", []))


def pytest_collection_modifyitems(config: pytest.Config, items: list[Any]) -> None:
    used: set[str] = set()
    for item in items:
        for entry in _ENTRIES:
            if _matches(item.nodeid, entry["test"]):
                item.add_marker(pytest.mark.skip(reason=f"erllama: {entry['reason']}"))
                used.add(entry["test"])
                break
    stale = [e["test"] for e in _ENTRIES if e["test"] not in used]
    if stale and not config.getoption("keyword") and not config.getoption("markexpr"):
        raise pytest.UsageError("skip entries that match no test: " + ", ".join(stale))


def _matches(nodeid: str, name: str) -> bool:
    if name.endswith("*"):
        return nodeid.startswith(name[:-1])
    return nodeid == name or nodeid.startswith((name + "::", name + "["))
