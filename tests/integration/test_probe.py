"""The ABI probe against real headers: the pinned tree, the PyPI fallback tree, and deliberately drifted copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import build_llama as bl
from erllama._native import abi_mismatches


@pytest.fixture(scope="module")
def pinned() -> bl.Source:
    return bl.resolve_source(bl.BuildOptions())


def _copy_headers(source: bl.Source, dest: Path) -> bl.Source:
    for sub in ("include", "ggml/include"):
        shutil.copytree(source.path / sub, dest / sub)
    return bl.Source(path=dest, source_id="test-copy", origin="test")


def test_pinned_tree_matches_the_cdef(pinned: bl.Source, tmp_path: Path) -> None:
    out = bl.run_abi_probe(pinned, tmp_path / "probe", tmp_path / "abi.json")
    assert abi_mismatches(json.loads(out.read_text())) == []


def test_a_drifted_signature_stops_the_build(pinned: bl.Source, tmp_path: Path) -> None:
    copy = _copy_headers(pinned, tmp_path / "src")
    header = copy.path / "include" / "llama.h"
    text = header.read_text()
    assert "LLAMA_API uint32_t llama_n_ctx      (const struct llama_context * ctx);" in text
    header.write_text(text.replace("LLAMA_API uint32_t llama_n_ctx      (", "LLAMA_API uint64_t llama_n_ctx      ("))
    with pytest.raises(bl.BuildError, match="llama_n_ctx"):
        bl.run_abi_probe(copy, tmp_path / "probe", tmp_path / "abi.json")


def test_a_drifted_struct_is_reported(pinned: bl.Source, tmp_path: Path) -> None:
    copy = _copy_headers(pinned, tmp_path / "src")
    header = copy.path / "include" / "llama.h"
    text = header.read_text()
    marker = "        uint32_t n_seq_max;             // max number of sequences"
    assert marker in text
    header.write_text(text.replace(marker, "        uint32_t n_new_field;\n" + marker))
    out = bl.run_abi_probe(copy, tmp_path / "probe", tmp_path / "abi.json")
    problems = abi_mismatches(json.loads(out.read_text()))
    assert any("struct llama_context_params: sizeof" in p for p in problems)
    assert any("llama_context_params.n_seq_max" in p for p in problems)


@pytest.mark.slow
def test_pypi_fallback_source_is_fetched_verified_and_abi_compatible(tmp_path: Path) -> None:
    """The llama-cpp-python sdist vendors a newer llama.cpp; the cdef must still describe it exactly."""
    source = bl._fetch_pypi(bl.load_pin(), tmp_path)
    assert source.source_id.startswith("sdist-")
    assert (source.path / "include" / "llama.h").is_file()
    assert (tmp_path / "llama-cpp-python-0.3.36" / ".erllama-ok").is_file()
    out = bl.run_abi_probe(source, tmp_path / "probe", tmp_path / "abi.json")
    assert abi_mismatches(json.loads(out.read_text())) == []
