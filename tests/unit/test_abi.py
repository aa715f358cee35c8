"""The cdef's struct layouts against the ABI probe compiled from the real llama.h."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def abi(native: None) -> dict[str, Any]:
    from erllama._native import library

    lib = library()
    assert lib.abi_file is not None, "the build has no abi.json"
    data: dict[str, Any] = json.loads(lib.abi_file.read_text())
    return data


def _complete_structs() -> list[str]:
    from erllama._native.loader import ffi

    names = []
    for name in ffi.list_types()[1]:
        try:
            ffi.sizeof(f"struct {name}")
        except ffi.error:
            continue
        names.append(f"struct {name}")
    return names


def test_every_declared_struct_is_probed(abi: dict[str, Any]) -> None:
    declared = _complete_structs()
    assert len(declared) >= 10
    assert sorted(declared) == sorted(abi["structs"])


def test_sizeof_and_offsetof_match_for_every_field(abi: dict[str, Any]) -> None:
    from erllama._native.loader import ffi

    checked = 0
    for name, probe in abi["structs"].items():
        ctype = ffi.typeof(name)
        assert ffi.sizeof(ctype) == probe["sizeof"], name
        fields = [f for f, _ in ctype.fields]
        assert sorted(fields) == sorted(probe["offsetof"]), name
        for field in fields:
            assert ffi.offsetof(ctype, field) == probe["offsetof"][field], f"{name}.{field}"
            checked += 1
    assert checked > 80  # llama_context_params alone has over 40 fields


def test_abi_mismatches_reports_drift(abi: dict[str, Any]) -> None:
    from erllama._native import abi_mismatches

    assert abi_mismatches(abi) == []
    drifted = copy.deepcopy(abi)
    drifted["structs"]["struct llama_context_params"]["offsetof"]["n_threads"] += 4
    drifted["structs"]["struct llama_batch"]["sizeof"] += 8
    problems = abi_mismatches(drifted)
    assert any("llama_context_params.n_threads" in p for p in problems)
    assert any("struct llama_batch: sizeof" in p for p in problems)
    del drifted["structs"]["struct llama_model_params"]
    assert any("llama_model_params: not measured" in p for p in abi_mismatches(drifted))
