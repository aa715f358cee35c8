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


def test_build_kinds_flags_and_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = bl.Source(path=tmp_path, source_id="git-abc", origin="test")
    native = bl.cmake_flags(bl.BuildOptions())
    assert "-DGGML_NATIVE=ON" in native
    assert not any("LLAMAFILE" in f for f in native), "stock kernels by default"
    assert "-DGGML_LLAMAFILE=OFF" in bl.cmake_flags(bl.BuildOptions(deterministic=True))
    portable = bl.cmake_flags(bl.BuildOptions(cpu_kind="portable"))
    assert {"-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF"} <= set(portable)
    haswell = bl.cmake_flags(bl.BuildOptions(cpu_level="haswell"))
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_INT8=OFF"} <= set(
        haswell
    )
    with pytest.raises(bl.BuildError, match="unknown CPU level"):
        bl.cmake_flags(bl.BuildOptions(cpu_level="pentium"))
    keys = {bl.build_key(src, bl.BuildOptions(**kw)) for kw in (
        {}, {"deterministic": True}, {"cpu_kind": "portable"}, {"cpu_level": "haswell"}, {"stock": True})}  # fmt: skip
    assert len(keys) == 5
    assert bl.build_key(src, bl.BuildOptions(stock=True)).startswith("stock-")
    # a portable build's identity does not include the CPU it was built on (copies and shared caches keep working)
    monkeypatch.setattr(bl, "_cpu_flags", lambda: "another-cpu")
    assert bl.build_key(src, bl.BuildOptions(cpu_kind="portable")) in keys
    assert bl.build_key(src, bl.BuildOptions()) not in keys


def test_the_stock_build_is_llama_cpps_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bl, "cpu_has_amx", lambda: False)
    assert bl.cmake_flags(bl.BuildOptions(stock=True)) == list(bl.BASE_CMAKE_FLAGS)
    monkeypatch.setattr(bl, "cpu_has_amx", lambda: True)  # the unpatched AMX path crashes: compiled out there
    assert bl.cmake_flags(bl.BuildOptions(stock=True)) == [*bl.BASE_CMAKE_FLAGS, *bl.NO_AMX_FLAGS]


def test_the_lower_kernel_set_is_below_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    for flags, level in (("fpu avx2 avx512f", "haswell"), ("fpu avx avx2", "sandybridge"), ("fpu sse4_2", "x64")):
        monkeypatch.setattr(bl, "_cpu_flags_line", lambda flags=flags: "flags\t\t: " + flags)
        assert bl.lower_cpu_level() == level
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert bl.lower_cpu_level() == "armv8"


def test_patches_apply_to_a_copy_and_name_the_source(tmp_path: Path) -> None:
    tree = tmp_path / "pristine"
    target = tree / "ggml" / "src" / "ggml-cpu" / "amx"
    target.mkdir(parents=True)
    assert bl.patch_set(), "native/patches/ carries erllama's patches"
    # a tree holding the one file the patch set touches, as the pinned source has it
    pinned = bl.resolve_source(bl.BuildOptions())
    (target / "mmq.cpp").write_bytes((pinned.path / "ggml/src/ggml-cpu/amx/mmq.cpp").read_bytes())
    src = bl.Source(path=tree, source_id="git-test", origin="test")
    options = bl.BuildOptions(cache_dir=tmp_path / "cache")
    patched = bl.apply_patches(src, options)
    assert patched.path != tree
    assert patched.source_id.startswith("git-test+patches-")
    text = (patched.path / "ggml/src/ggml-cpu/amx/mmq.cpp").read_text()
    assert "static constexpr tile_config_t ggml_amx_tile_config" in text
    assert "ARCH_REQ_XCOMP_PERM" in text
    assert "erllama patch" not in (target / "mmq.cpp").read_text(), "the pristine tree is never touched"
    assert bl.apply_patches(src, options) == patched, "made once, then reused"
    (target / "mmq.cpp").write_text("/* another file */\n")
    with pytest.raises(bl.BuildError, match="does not apply"):
        bl.apply_patches(bl.Source(path=tree, source_id="git-other", origin="test"), options)


def _result(tmp_path: Path, options: bl.BuildOptions) -> bl.BuildResult:
    src = bl.Source(path=tmp_path, source_id="git-abc", origin="test")
    lib = tmp_path / bl.build_key(src, options) / "build" / "bin"
    return bl.BuildResult(key=lib.parent.parent.name, build_root=lib.parent.parent, lib_dir=lib, tools={},
                          abi_file=lib / "abi.json", source=src, options=options)  # fmt: skip


def test_a_build_that_fails_its_self_check_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[bl.BuildOptions] = []
    monkeypatch.setattr(bl, "cpu_has_amx", lambda: True)

    def build(source: bl.Source, options: bl.BuildOptions) -> bl.BuildResult:
        built.append(options)
        return _result(tmp_path, options)

    def prove(lib_dir: Path) -> dict[str, object]:
        ok = len(built) == 3  # native and native-without-AMX crash; portable passes
        return {"usable": ok, "summary": "ok" if ok else "native (the smoke decode died of SIGSEGV)"}

    monkeypatch.setattr(bl, "_ensure_built", build)
    monkeypatch.setattr(bl, "prove_build", prove)
    result = bl._ensure_proven(bl.Source(path=tmp_path, source_id="git-abc", origin="test"), bl.BuildOptions())
    assert [o.flavor for o in built] == ["cpu-native", "cpu-native", "cpu-portable"]
    assert set(bl.NO_AMX_FLAGS) <= set(built[1].extra_cmake_flags)
    assert result.options.cpu_kind == "portable"
    assert result.proof == {"usable": True, "summary": "ok"}


def test_no_build_that_passes_is_an_error_not_a_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bl, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(bl, "_ensure_built", lambda source, options: _result(tmp_path, options))
    monkeypatch.setattr(bl, "prove_build", lambda lib_dir: {"usable": False, "summary": "x64 (wrong logits)"})
    with pytest.raises(bl.BuildError, match=r"no build of this llama\.cpp passed its self-check.*wrong logits"):
        bl._ensure_proven(bl.Source(path=tmp_path, source_id="git-abc", origin="test"), bl.BuildOptions())


def test_a_stock_gpu_build_only_adds_its_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bl, "cpu_has_amx", lambda: False)
    assert bl.cmake_flags(bl.BuildOptions(stock=True, backend="cuda")) == [*bl.BASE_CMAKE_FLAGS, "-DGGML_CUDA=ON"]
