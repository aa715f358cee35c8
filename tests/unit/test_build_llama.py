"""build_llama.py without building: pins, checksums, build keys, the generated probe table and cffi module."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import build_llama as bl


def test_pin_names_the_issue_sources() -> None:
    pin = bl.load_pin()
    assert pin["llama_cpp"]["commit"].startswith("de3ff81")
    assert (pin["npm"]["package"], pin["npm"]["version"]) == ("node-llama-cpp", "3.22.1")
    assert (pin["pypi"]["package"], pin["pypi"]["version"]) == ("llama-cpp-python", "0.3.36")
    for key in ("tarball_sha256", "bundle_sha256"):
        assert re.fullmatch(r"[0-9a-f]{64}", pin["npm"][key])
    assert re.fullmatch(r"[0-9a-f]{64}", pin["pypi"]["sdist_sha256"])


def test_checksum_mismatch_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"llama")
    bl.verify_sha256(f, bl.sha256_file(f), "blob")
    with pytest.raises(bl.BuildError, match="checksum mismatch"):
        bl.verify_sha256(f, "0" * 64, "blob")


def test_source_dir_must_be_llama_cpp(tmp_path: Path) -> None:
    with pytest.raises(bl.BuildError, match=r"not a llama\.cpp source tree"):
        bl.source_from_dir(tmp_path, bl.load_pin(), allow_unpinned=True)


def test_unpinned_source_dir_needs_consent(tmp_path: Path) -> None:
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "llama.h").write_text("/* not the pinned header */\n")
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    with pytest.raises(bl.BuildError, match="not the pinned"):
        bl.source_from_dir(tmp_path, bl.load_pin(), allow_unpinned=False)
    src = bl.source_from_dir(tmp_path, bl.load_pin(), allow_unpinned=True)
    assert src.source_id.startswith("tree-")
    (tmp_path / "include" / "llama.h").write_text("/* changed */\n")
    assert bl.source_from_dir(tmp_path, bl.load_pin(), allow_unpinned=True).source_id != src.source_id


def test_build_key_depends_on_backend_flags_and_source(tmp_path: Path) -> None:
    src = bl.Source(path=tmp_path, source_id="git-abc", origin="test")
    cpu = bl.build_key(src, bl.BuildOptions())
    assert cpu.startswith("cpu-")
    assert cpu == bl.build_key(src, bl.BuildOptions())
    assert bl.build_key(src, bl.BuildOptions(with_tools=True)) == cpu, "tools are built into the same tree"
    assert bl.build_key(src, bl.BuildOptions(backend="cuda")).startswith("cuda-")
    assert bl.build_key(src, bl.BuildOptions(extra_cmake_flags=("-DGGML_AVX512=OFF",))) != cpu
    other = bl.Source(path=tmp_path, source_id="git-def", origin="test")
    assert bl.build_key(other, bl.BuildOptions()) != cpu


def test_default_flags_keep_the_build_offline_and_shared() -> None:
    flags = bl.cmake_flags(bl.BuildOptions())
    for flag in ("-DBUILD_SHARED_LIBS=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF"):
        assert flag in flags
    assert "-DGGML_CUDA=ON" in bl.cmake_flags(bl.BuildOptions(backend="cuda"))
    assert "-DGGML_METAL=ON" in bl.cmake_flags(bl.BuildOptions(backend="metal"))
    with pytest.raises(bl.BuildError, match="unknown backend"):
        bl.cmake_flags(bl.BuildOptions(backend="rocm"))


def test_probe_table_covers_every_function_and_struct_field() -> None:
    ffi = bl._parsed_cdef()
    table = bl.generate_probe_table(ffi)
    cdef = bl.CDEF_FILE.read_text()
    functions = set(re.findall(r"\b(llama_\w+|ggml_backend_dev_\w+)\s*\(", cdef))
    functions -= {"llama_progress_callback"}
    for fn in functions:
        assert re.search(rf"\(\s*{fn}\)\(", table), f"{fn} is not re-declared in the probe"
    assert "PROBE_FIELD(struct llama_context_params, abort_callback_data)" in table
    assert "PROBE_FIELD(struct llama_batch, logits)" in table
    assert "PROBE_STRUCT(struct llama_model)" not in table, "opaque structs have no layout to probe"


def test_generated_ffi_module_is_current(tmp_path: Path) -> None:
    fresh = bl.generate_ffi_module(tmp_path / "_llama_ffi.py").read_text()
    assert fresh == bl.FFI_MODULE.read_text(), "run `python build_llama.py --ffi-only`"
