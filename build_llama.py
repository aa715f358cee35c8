#!/usr/bin/env python3
"""Build the pinned llama.cpp as shared libraries for erllama, and generate the cffi module that binds them.

Usage::

    python build_llama.py                      # CPU build, the default
    python build_llama.py --backend cuda       # or metal
    python build_llama.py --with-tools         # also llama-bench, llama-batched-bench, llama-server
    python build_llama.py --source ~/llama.cpp # build an existing checkout instead of the pinned download

Where the source comes from, in order: ``--source DIR``; the npm package pinned in ``native/pin.toml`` (its tarball
carries the llama.cpp tree as a git bundle); the PyPI sdist of llama-cpp-python pinned there too. Every download is
checked against its sha256 before it is unpacked.

Builds land in ``$ERLLAMA_CACHE_DIR/llama/<key>/`` (default ``~/.cache/erllama``), the key hashing the source id,
the backend, the CMake flags, the compiler and (for native builds) the CPU's feature flags. A finished build is
never redone; ``--with-tools`` adds the tool targets to the same build tree, so the tools link the very libllama
that erllama loads. After building, the ABI probe (``native/abi_probe.c``) is compiled against that tree's header
and its layouts are written to ``abi.json`` beside the libraries.

The last line printed is the library directory; ``erllama`` finds it through ``current.json`` in the cache (or
``ERLLAMA_LIB_DIR``, which always wins).

Importable: ``ensure_built(BuildOptions(...)) -> BuildResult``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "native"
PIN_FILE = NATIVE / "pin.toml"
CDEF_FILE = NATIVE / "llama.cdef"
SHIM_FILE = NATIVE / "erllama_shim.cpp"
PROBE_SOURCE = NATIVE / "abi_probe.c"
FFI_MODULE = ROOT / "erllama" / "_native" / "_llama_ffi.py"

BACKENDS = ("cpu", "cuda", "metal")
TOOL_TARGETS = ("llama-bench", "llama-batched-bench", "llama-server")
LIB_TARGETS = ("llama",)

# Options every build gets. Tools, tests and examples stay off unless --with-tools; the server's web UI is never
# downloaded and nothing links OpenSSL.
BASE_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_TOOLS_INSTALL=OFF",
)
# CPU builds keep llama.cpp's default kernels (llamafile's sgemm on): stock prefill speed. Exact and parent_key cache
# hits stay bit-identical anyway, because cold and warm paths decode the last prompt token alone (docs/native.md).
# --deterministic turns sgemm off so every matmul computes an output element the same way whatever the batch: partial
# hits then match cold runs bit for bit too, at a prefill cost that depends on the CPU (docs/native.md, "Batch
# invariance").
DETERMINISTIC_FLAGS = ("-DGGML_LLAMAFILE=OFF",)
# Two kinds of CPU build. native: compiled for the CPU in front of it (-march=native), what a user of llama.cpp gets
# by default. portable: ggml's CPU backend as dynamically loaded variants, one per x86-64 / ARM64 feature level,
# the best one for the CPU picked at load time (as llama.cpp's release binaries and Ollama do); the build can be
# copied to, or shared with, machines with other CPUs.
CPU_KIND_FLAGS = {
    "native": ("-DGGML_NATIVE=ON",),
    "portable": ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"),
}
CPU_KINDS = tuple(CPU_KIND_FLAGS)
# native by default: stock llama.cpp's kernels and flags, built in ~2 minutes on 2 cores; the portable build compiles
# 14 x86-64 variants (~40 minutes there). docs/native.md has the measurements.
DEFAULT_CPU_KIND = "native"
# Fixed instruction-set levels (ggml's own variant table, as one non-DL build): the second kernel set the tests run
# against (a level below what the CPU has), and a way to build for an older CPU than this one.
_X86_FEATURES = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
                 "AVX512_BF16", "AMX_TILE", "AMX_INT8", "AMX_BF16")  # fmt: skip
CPU_LEVELS = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "haswell": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "skylakex": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
    "armv8": (),  # ARM64 without -mcpu=native: the baseline every ARM64 CPU runs
}
BACKEND_CMAKE_FLAGS = {
    "cpu": (),
    "cuda": ("-DGGML_NATIVE=ON", "-DGGML_CUDA=ON"),
    "metal": ("-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"),
}
# The native fallback for a CPU whose AMX path failed its self-check: everything the CPU has but the tile units.
NO_AMX_FLAGS = ("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")  # fmt: skip
PATCH_DIR = NATIVE / "patches"


class BuildError(RuntimeError):
    """The source could not be fetched, verified or built."""


@dataclasses.dataclass(frozen=True, slots=True)
class BuildOptions:
    """What to build."""

    backend: str = "cpu"
    with_tools: bool = False
    source: Path | None = None
    allow_unpinned: bool = False
    jobs: int | None = None
    cache_dir: Path | None = None
    extra_cmake_flags: tuple[str, ...] = ()
    cpu_kind: str = DEFAULT_CPU_KIND
    cpu_level: str | None = None
    deterministic: bool = False
    stock: bool = False
    prove: bool = True
    patches: bool = True  # False only for the tests that show what the patches fix; never recorded as current
    make_current: bool = True  # False: record only current-<flavor>.json (a benchmark's alternative build)

    @property
    def flavor(self) -> str:
        """What the build is called in its key and its manifest: cpu-portable, cpu-native, cuda, ..., stock."""
        if self.stock:
            return "stock"
        if self.backend != "cpu":
            return self.backend + ("" if self.patches else "-unpatched")
        return f"cpu-{self.cpu_level or self.cpu_kind}" + ("" if self.patches else "-unpatched")


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """A llama.cpp tree on disk and the id that names its contents."""

    path: Path
    source_id: str
    origin: str


@dataclasses.dataclass(frozen=True, slots=True)
class BuildResult:
    """Where a finished build lives."""

    key: str
    build_root: Path
    lib_dir: Path
    tools: dict[str, Path]
    abi_file: Path
    source: Source
    options: BuildOptions
    proof: dict[str, Any] | None = None


def log(msg: str) -> None:
    print(f"[build_llama] {msg}", file=sys.stderr, flush=True)


def cache_root(options: BuildOptions | None = None) -> Path:
    if options is not None and options.cache_dir is not None:
        return options.cache_dir
    env = os.environ.get("ERLLAMA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "erllama"


def load_pin() -> dict[str, dict[str, str]]:
    with PIN_FILE.open("rb") as fh:
        return tomllib.load(fh)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise BuildError(f"checksum mismatch for {what} ({path}): expected sha256 {expected}, got {got}")


def run(cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    args = [str(c) for c in cmd]
    try:
        proc = subprocess.run(args, cwd=cwd, env=env, check=False, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise BuildError(f"could not run {args[0]}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(args)}\n{tail}")
    return proc.stdout


def run_streaming(
    cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> None:
    """Run a long command, showing its progress on stderr: a progress bar driven by CMake's ``[ NN%]`` lines on a
    terminal (when rich is installed), the progress lines themselves otherwise."""
    args = [str(c) for c in cmd]
    log("$ " + " ".join(args))
    bar: Any = None
    if sys.stderr.isatty():
        try:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
        except ImportError:
            pass
        else:
            bar = Progress(TextColumn("  building"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                           TextColumn("{task.description}"), transient=True)  # fmt: skip
    with contextlib.ExitStack() as stack:
        task = None
        if bar is not None:
            stack.enter_context(bar)
            task = bar.add_task("", total=100)
        with subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            tail: list[str] = []
            for line in proc.stdout:
                tail.append(line)
                del tail[:-60]
                percent = re.match(r"\[\s*(\d+)%\]\s*(.*)", line)
                if bar is not None and percent:
                    what = percent.group(2).rsplit("/", 1)[-1][:40]
                    bar.update(task, completed=int(percent.group(1)), description=what)
                elif line.startswith("[") or "error" in line.lower():
                    if bar is not None:
                        bar.console.print("  " + line.rstrip("\n"), markup=False, highlight=False)
                    else:
                        sys.stderr.write("  " + line)
            rc = proc.wait()
    if rc != 0:
        raise BuildError(f"command failed ({rc}): {' '.join(args)}\n{''.join(tail)}")


# --------------------------------------------------------------------------------------------------------------
# Source


def _git_source_id(path: Path) -> str | None:
    if not (path / ".git").exists():
        return None
    head = run(["git", "rev-parse", "HEAD"], cwd=path).strip()
    dirty = run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path)
    if dirty:
        diff = run(["git", "diff", "HEAD"], cwd=path)
        return f"git-{head}-dirty-{hashlib.sha256(diff.encode()).hexdigest()[:12]}"
    return f"git-{head}"


def _tree_source_id(path: Path) -> str:
    """A content id for a tree without git: hashes every file under the directories that make up the build."""
    h = hashlib.sha256()
    for sub in ("CMakeLists.txt", "cmake", "include", "src", "ggml", "common", "tools", "vendor"):
        base = path / sub
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            h.update(str(f.relative_to(path)).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return f"tree-{h.hexdigest()[:24]}"


def source_from_dir(path: Path, pin: dict[str, dict[str, str]], allow_unpinned: bool) -> Source:
    path = path.expanduser().resolve()
    if not (path / "include" / "llama.h").is_file() or not (path / "CMakeLists.txt").is_file():
        raise BuildError(f"{path} is not a llama.cpp source tree (no include/llama.h)")
    source_id = _git_source_id(path) or _tree_source_id(path)
    pinned = f"git-{pin['llama_cpp']['commit']}"
    if source_id != pinned and not allow_unpinned:
        raise BuildError(
            f"{path} is {source_id}, not the pinned {pinned}; pass --allow-unpinned to build it anyway "
            "(the ABI probe still checks the struct layouts)"
        )
    return Source(path=path, source_id=source_id, origin=f"dir:{path}")


def _fetch_npm(pin: dict[str, dict[str, str]], src_root: Path) -> Source:
    npm = pin["npm"]
    commit = pin["llama_cpp"]["commit"]
    dest = src_root / f"llama.cpp-{commit[:12]}"
    if (dest / ".erllama-ok").is_file():
        return Source(path=dest, source_id=f"git-{commit}", origin=f"npm:{npm['package']}@{npm['version']}")
    if shutil.which("npm") is None:
        raise BuildError("npm is not installed")
    with tempfile.TemporaryDirectory(dir=src_root) as tmp_s:
        tmp = Path(tmp_s)
        log(f"fetching {npm['package']}@{npm['version']} from the npm registry")
        run(["npm", "pack", "--silent", f"{npm['package']}@{npm['version']}", "--pack-destination", tmp])
        tarballs = list(tmp.glob("*.tgz"))
        if len(tarballs) != 1:
            raise BuildError(f"npm pack produced {len(tarballs)} tarballs")
        verify_sha256(tarballs[0], npm["tarball_sha256"], "the npm tarball")
        with tarfile.open(tarballs[0]) as tf:
            member = tf.getmember(npm["bundle_member"])
            tf.extractall(tmp / "x", members=[member], filter="data")
        bundle = tmp / "x" / npm["bundle_member"]
        verify_sha256(bundle, npm["bundle_sha256"], "the llama.cpp git bundle")
        clone = tmp / "llama.cpp"
        run(["git", "clone", "--quiet", bundle, clone])
        head = run(["git", "rev-parse", "HEAD"], cwd=clone).strip()
        if head != commit:
            raise BuildError(f"the bundle's HEAD is {head}, the pin says {commit}")
        (clone / ".erllama-ok").write_text(commit + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        clone.rename(dest)
    return Source(path=dest, source_id=f"git-{commit}", origin=f"npm:{npm['package']}@{npm['version']}")


def _fetch_pypi(pin: dict[str, dict[str, str]], src_root: Path) -> Source:
    pypi = pin["pypi"]
    sha = pypi["sdist_sha256"]
    dest = src_root / f"llama-cpp-python-{pypi['version']}"
    source = Source(
        path=dest / "llama.cpp", source_id=f"sdist-{sha[:24]}", origin=f"pypi:{pypi['package']}=={pypi['version']}"
    )
    if (dest / ".erllama-ok").is_file():
        return source
    with tempfile.TemporaryDirectory(dir=src_root) as tmp_s:
        tmp = Path(tmp_s)
        log(f"fetching the sdist of {pypi['package']}=={pypi['version']} from PyPI")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{pypi['package']}=={pypi['version']}",
                "-d",
                tmp,
            ]
        )
        sdists = list(tmp.glob("*.tar.gz"))
        if len(sdists) != 1:
            raise BuildError(f"pip download produced {len(sdists)} sdists")
        verify_sha256(sdists[0], sha, "the llama-cpp-python sdist")
        prefix = sdists[0].name.removesuffix(".tar.gz") + "/" + pypi["vendor_dir"] + "/"
        out = tmp / "out"
        with tarfile.open(sdists[0]) as tf:
            members = []
            for m in tf.getmembers():
                if m.name.startswith(prefix):
                    m.name = "llama.cpp/" + m.name[len(prefix) :]
                    members.append(m)
            if not members:
                raise BuildError(f"the sdist has no {pypi['vendor_dir']}")
            tf.extractall(out, members=members, filter="data")
        (out / ".erllama-ok").write_text(sha + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        out.rename(dest)
    return source


def resolve_source(options: BuildOptions) -> Source:
    pin = load_pin()
    if options.source is not None:
        return source_from_dir(options.source, pin, options.allow_unpinned)
    src_root = cache_root(options) / "src"
    src_root.mkdir(parents=True, exist_ok=True)
    errors = []
    for fetch in (_fetch_npm, _fetch_pypi):
        try:
            return fetch(pin, src_root)
        except BuildError as exc:
            errors.append(f"{fetch.__name__}: {exc}")
            log(f"source {fetch.__name__} failed: {exc}")
    raise BuildError("could not obtain the llama.cpp source:\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------------------------------------------
# Build


def _compiler_id() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        return run([cc, "--version"]).splitlines()[0]
    except BuildError:
        return cc


def _cpu_flags_line() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cpu_flags() -> str:
    line = _cpu_flags_line()
    return hashlib.sha256(line.encode()).hexdigest()[:16] if line else platform.machine()


def cpu_has_amx() -> bool:
    return "amx_tile" in _cpu_flags_line().split()


def lower_cpu_level() -> str:
    """A kernel set below the one a native build picks here, so the tests see the paths other CPUs take: AVX2 on an
    AVX-512 machine, AVX on an AVX2 one, the x86-64 baseline below that, the ARMv8 baseline on ARM64."""
    flags = set(_cpu_flags_line().split())
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "armv8"
    if "avx512f" in flags:
        return "haswell"
    if "avx2" in flags:
        return "sandybridge"
    return "x64"


def cmake_flags(options: BuildOptions) -> list[str]:
    if options.backend not in BACKENDS:
        raise BuildError(f"unknown backend {options.backend!r}; choose one of {', '.join(BACKENDS)}")
    if options.cpu_kind not in CPU_KINDS:
        raise BuildError(f"unknown CPU build kind {options.cpu_kind!r}; choose one of {', '.join(CPU_KINDS)}")
    if options.stock:
        # llama.cpp's own defaults (GGML_NATIVE on, llamafile on), the peer benchmarks compare against. On a CPU
        # with AMX the unpatched tile path crashes (ggml-org/llama.cpp#20824), so there it is compiled out.
        gpu = [f for f in BACKEND_CMAKE_FLAGS[options.backend] if f != "-DGGML_NATIVE=ON"]  # NATIVE is the default
        return [*BASE_CMAKE_FLAGS, *gpu, *(NO_AMX_FLAGS if cpu_has_amx() else ()), *options.extra_cmake_flags]
    flags = [*BASE_CMAKE_FLAGS, *BACKEND_CMAKE_FLAGS[options.backend]]
    if options.backend == "cpu" and options.cpu_level is not None:
        if options.cpu_level not in CPU_LEVELS:
            raise BuildError(f"unknown CPU level {options.cpu_level!r}; choose one of {', '.join(CPU_LEVELS)}")
        wanted = CPU_LEVELS[options.cpu_level]
        flags.append("-DGGML_NATIVE=OFF")
        if options.cpu_level != "armv8":
            flags += [f"-DGGML_{f}={'ON' if f in wanted else 'OFF'}" for f in _X86_FEATURES]
    elif options.backend == "cpu":
        flags += CPU_KIND_FLAGS[options.cpu_kind]
    if options.deterministic:
        flags += DETERMINISTIC_FLAGS
    return [*flags, *options.extra_cmake_flags]


def patch_set() -> list[Path]:
    """erllama's patches to the pinned llama.cpp (native/patches/*.patch), in the order they apply."""
    return sorted(PATCH_DIR.glob("*.patch"))


def patches_digest(patches: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def apply_patches(source: Source, options: BuildOptions) -> Source:
    """A copy of ``source`` with erllama's patches applied (made once per source and patch set, then reused).

    The pristine tree is never touched: the stock build, the peer of the benchmarks, is built from it.
    """
    patches = patch_set()
    if not patches:
        return source
    digest = patches_digest(patches)
    source_id = f"{source.source_id}+patches-{digest[:12]}"
    src_root = cache_root(options) / "src"
    src_root.mkdir(parents=True, exist_ok=True)
    dest = src_root / f"patched-{hashlib.sha256(source_id.encode()).hexdigest()[:16]}"
    patched = Source(path=dest, source_id=source_id, origin=f"{source.origin} + {len(patches)} erllama patch(es)")
    if (dest / ".erllama-ok").is_file():
        return patched
    with tempfile.TemporaryDirectory(dir=src_root) as tmp_s:
        tree = Path(tmp_s) / "tree"
        shutil.copytree(source.path, tree, ignore=shutil.ignore_patterns(".git"), symlinks=True)
        for patch in patches:
            try:
                run(["patch", "-p1", "--forward", "--batch", "--quiet", "--dry-run", "-i", patch], cwd=tree)
            except BuildError as exc:
                raise BuildError(f"{patch.name} does not apply to {source.source_id} ({source.origin}): {exc}") from exc
            run(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", patch], cwd=tree)
            log(f"applied {patch.name}")
        (tree / ".erllama-ok").write_text(source_id + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tree.rename(dest)
    return patched


def build_key(source: Source, options: BuildOptions) -> str:
    flags = cmake_flags(options)
    # A portable build runs on any CPU of its architecture, so the CPU in front of the builder is not part of its
    # identity (copies and shared caches keep working); a native one is compiled for it.
    portable = (
        options.backend == "cpu"
        and not options.stock
        and (options.cpu_kind == "portable" or options.cpu_level is not None)
    )
    ident = {
        "source": source.source_id,
        "backend": options.backend,
        "flavor": options.flavor,
        "flags": flags,
        "compiler": _compiler_id(),
        "cpu": platform.machine() if portable or options.backend == "metal" else _cpu_flags(),
        "platform": f"{platform.system()}-{platform.machine()}",
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{options.flavor}-{digest}"


def _build_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CCACHE_DIR", str(root / "ccache"))
    env.setdefault("CCACHE_BASEDIR", str(root))
    env.setdefault("CCACHE_NOHASHDIR", "1")
    return env


def _lib_suffix() -> str:
    return ".dylib" if sys.platform == "darwin" else ".so"


def _shared_lib_name(stem: str) -> str:
    return f"lib{stem}{_lib_suffix()}"


def _configure_and_build(source: Source, options: BuildOptions, build_root: Path, targets: Sequence[str]) -> None:
    build_dir = build_root / "build"
    env = _build_env(cache_root(options))
    jobs = options.jobs or os.cpu_count() or 2
    if not (build_dir / "CMakeCache.txt").is_file():
        run_streaming(["cmake", "-S", source.path, "-B", build_dir, *cmake_flags(options)], env=env)
    t0 = time.monotonic()
    run_streaming(
        ["cmake", "--build", build_dir, "--config", "Release", "-j", str(jobs), "--target", *targets], env=env
    )
    log(f"built {', '.join(targets)} in {time.monotonic() - t0:.0f}s")


def build_shim(source: Source, options: BuildOptions, build_root: Path) -> Path:
    """Compile ``native/erllama_shim.cpp`` (C entry points into libllama-common) beside libllama.

    Rebuilt whenever the shim's source changes (its sha256 is recorded in ``shim.ok``); links the
    ``llama-common`` target, built first if a libraries-only build did not make it.
    """
    lib_dir = build_root / "build" / "bin"
    out = lib_dir / _shared_lib_name("erllama-shim")
    marker = build_root / "shim.ok"
    digest = sha256_file(SHIM_FILE)
    if out.is_file() and marker.is_file() and marker.read_text().strip() == digest:
        return out
    if not (lib_dir / _shared_lib_name("llama-common")).exists():
        _configure_and_build(source, options, build_root, ("llama-common",))
    rpath = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"
    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{source.path / d}" for d in ("common", "include", "ggml/include", "vendor")]
    run(
        [
            cxx,
            "-std=c++17",
            "-O2",
            "-shared",
            "-fPIC",
            *includes,
            SHIM_FILE,
            f"-L{lib_dir}",
            "-lllama-common",
            f"-Wl,-rpath,{rpath}",
            "-o",
            out,
        ]
    )
    marker.write_text(digest + "\n")
    log(f"built {out.name}")
    return out


# --------------------------------------------------------------------------------------------------------------
# cdef, cffi module and ABI probe


def _parsed_cdef() -> object:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF_FILE.read_text())
    return ffi


def generate_probe_table(ffi: object) -> str:
    """C code for the probe: every cdef function re-declared, and one PROBE line per struct field."""
    decls: dict[str, tuple[object, int]] = ffi._parser._declarations  # type: ignore[attr-defined]
    lines = ["/* generated by build_llama.py from native/llama.cdef; do not edit */"]
    for key in sorted(decls):
        kind, _, name = key.partition(" ")
        if kind == "function":
            tp = decls[key][0]
            lines.append(tp.as_raw_function().get_c_name(" " + name) + ";")  # type: ignore[attr-defined]
    probes = []
    _typedefs, structs, _unions = ffi.list_types()  # type: ignore[attr-defined]
    for name in structs:
        tp = ffi.typeof(f"struct {name}")  # type: ignore[attr-defined]
        if tp.fields is None:
            continue  # opaque: only ever handled through pointers
        probes.append(f"PROBE_STRUCT(struct {name})")
        probes.extend(f"PROBE_FIELD(struct {name}, {field})" for field, _ in tp.fields)
    lines.append("#define PROBE_TABLE \\")
    lines.extend(f"    {p} \\" for p in probes)
    lines.append("")
    return "\n".join(lines) + "\n"


def run_abi_probe(source: Source, probe_dir: Path, out: Path) -> Path:
    """Compile and run the probe against this tree's headers; write the layouts to ``out`` (abi.json)."""
    ffi = _parsed_cdef()
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / "abi_probe_table.h").write_text(generate_probe_table(ffi))
    exe = probe_dir / "abi_probe"
    cc = os.environ.get("CC", "cc")
    includes = [source.path / "include", source.path / "ggml" / "include"]
    run(
        [
            cc,
            "-std=c11",
            "-Werror=incompatible-pointer-types",
            "-o",
            exe,
            PROBE_SOURCE,
            *[f"-I{p}" for p in (probe_dir, *includes)],
        ]
    )
    layouts: dict[str, dict[str, object]] = {}
    for line in run([exe]).splitlines():
        parts = line.split(" ")
        if parts[0] == "S":
            layouts[f"{parts[1]} {parts[2]}"] = {"sizeof": int(parts[3]), "offsetof": {}}
        elif parts[0] == "F":
            entry = layouts[f"{parts[1]} {parts[2]}"]
            entry["offsetof"][parts[3]] = int(parts[4])  # type: ignore[index]
    out.write_text(json.dumps({"source_id": source.source_id, "structs": layouts}, indent=2, sort_keys=True))
    return out


def generate_ffi_module(target: Path = FFI_MODULE) -> Path:
    """Emit the out-of-line ABI-mode cffi module (pure Python, no compiler) from native/llama.cdef."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF_FILE.read_text())
    ffi.set_source("erllama._native._llama_ffi", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / target.name
        with contextlib.redirect_stdout(io.StringIO()):  # cffi announces "generating <tmp file>" on stdout
            ffi.emit_python_code(str(tmp_file))
        text = tmp_file.read_text()
    header = f"# generated by build_llama.py from native/llama.cdef (sha256 {sha256_file(CDEF_FILE)[:16]})\n"
    text = header + text
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)
        log(f"wrote {target}")
    return target


# --------------------------------------------------------------------------------------------------------------
# Entry points


def _manifest(result: BuildResult, options: BuildOptions) -> dict[str, object]:
    return {
        "key": result.key,
        "backend": options.backend,
        "flavor": options.flavor,
        "cpu_kind": (options.cpu_level or options.cpu_kind) if options.backend == "cpu" and not options.stock else None,
        "deterministic": options.deterministic,
        "lib_dir": str(result.lib_dir),
        "tools": {k: str(v) for k, v in result.tools.items()},
        "abi_file": str(result.abi_file),
        "source_id": result.source.source_id,
        "origin": result.source.origin,
        "patches": [
            {"name": p.name, "sha256": sha256_file(p)}
            for p in ([] if options.stock or not options.patches else patch_set())
        ],
        "cmake_flags": cmake_flags(options),
        "selfcheck": result.proof,
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per cache: a second build_llama.py waits instead of racing in the same tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_built(options: BuildOptions) -> BuildResult:
    """Fetch, verify, patch, build and prove as needed; return where the libraries (and tools) are. Idempotent."""
    generate_ffi_module()
    if options.stock:
        options = dataclasses.replace(options, with_tools=True, prove=False)
    with _locked(cache_root(options) / "build.lock"):
        pristine = resolve_source(options)
        source = pristine if options.stock or not options.patches else apply_patches(pristine, options)
        result = _ensure_proven(source, options)
        options = result.options
        manifest = _manifest(result, options)
        root = cache_root(options) / "llama"
        (result.build_root / "build.json").write_text(json.dumps(manifest, indent=2))
        # current.json: what erllama loads (the last main build); current-<flavor>.json: each kind's latest
        if not options.patches:
            pointers = []
        elif options.stock or options.cpu_level is not None or not options.make_current:  # never instead of it
            pointers = [f"current-{options.flavor}.json"]
        else:
            pointers = [f"current-{options.flavor}.json", f"current-{options.backend}.json", "current.json"]
        for name in pointers:
            tmp = root / f".{name}.{os.getpid()}"
            tmp.write_text(json.dumps(manifest, indent=2))
            tmp.replace(root / name)
        return result


def _fallbacks(options: BuildOptions) -> list[tuple[str, BuildOptions]]:
    """What to build instead when a native CPU build fails its self-check, in order: without AMX where the CPU has
    it (the path of ggml-org/llama.cpp#20824), then portable (each variant proven on its own, the bad ones skipped)."""
    out = []
    if options.cpu_level is not None:
        return []
    if options.cpu_kind == "native" and cpu_has_amx() and not set(NO_AMX_FLAGS) <= set(options.extra_cmake_flags):
        out.append(("native without AMX", dataclasses.replace(options, extra_cmake_flags=(*options.extra_cmake_flags,
                                                                                         *NO_AMX_FLAGS))))  # fmt: skip
    if options.cpu_kind == "native":
        out.append(("portable", dataclasses.replace(options, cpu_kind="portable")))
    return out


def _ensure_proven(source: Source, options: BuildOptions) -> BuildResult:
    result = _ensure_built(source, options)
    if not options.prove or options.backend != "cpu" or options.stock:
        return result
    proof = prove_build(result.lib_dir)
    if proof["usable"]:
        return dataclasses.replace(result, proof=proof)
    log(f"the build failed its self-check: {proof['summary']}")
    for what, fallback in _fallbacks(options):
        log(f"falling back to a {what} build")
        result = _ensure_built(source, fallback)
        proof = prove_build(result.lib_dir)
        if proof["usable"]:
            return dataclasses.replace(result, proof=proof)
        log(f"the {what} build failed its self-check too: {proof['summary']}")
    raise BuildError(
        f"no build of this llama.cpp passed its self-check on this CPU: {proof['summary']}\n"
        "nothing was handed to erllama; the messages above say which variant failed and how"
    )


def prove_build(lib_dir: Path) -> dict[str, Any]:
    """Run the self-check (``erllama._native.selfcheck.main(["prove", ...])``) over a finished build: a smoke decode
    per CPU kernel variant, each in a child process of its own, compared with a NumPy reference. Its verdicts are
    recorded beside the libraries, where the loader reads them; verdicts already recorded for this CPU stand (a
    build's libraries never change under its key)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    code = "import sys; from erllama._native.selfcheck import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "prove", "--lib-dir", str(lib_dir), "--json", "--reuse"]
    log("self-check: a smoke decode per CPU variant, compared with a NumPy reference")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stderr.splitlines():
        log("  " + line)
    try:
        report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        hint = ""
        if "No module named" in proc.stderr:
            hint = ("\nrun build_llama.py with the Python erllama is installed in (scripts/bootstrap makes one), "
                    "or pass --no-prove to leave the self-check to the loader")  # fmt: skip
        raise BuildError(f"the self-check itself failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}{hint}") from exc
    return report


def _ensure_built(source: Source, options: BuildOptions) -> BuildResult:
    key = build_key(source, options)
    root = cache_root(options) / "llama"
    build_root = root / key
    lib_dir = build_root / "build" / "bin"
    libs_ok = build_root / "libs.ok"
    tools_ok = build_root / "tools.ok"
    build_root.mkdir(parents=True, exist_ok=True)
    log(f"source {source.source_id} ({source.origin})")
    log(f"build {build_root} ({options.flavor}{', deterministic' if options.deterministic else ''})")
    if not libs_ok.is_file():
        _configure_and_build(source, options, build_root, LIB_TARGETS)
        libs_ok.write_text("ok\n")
    else:
        log("libraries already built")
    if options.with_tools and not tools_ok.is_file():
        _configure_and_build(source, options, build_root, TOOL_TARGETS)
        tools_ok.write_text("ok\n")
    abi_file = run_abi_probe(source, build_root / "probe", lib_dir / "abi.json")
    if not options.stock:
        try:
            build_shim(source, options, build_root)
        except (BuildError, OSError) as exc:  # the binding works without it; grammars from JSON schemas do not
            log(f"warning: erllama's shim did not build ({exc}); JSON-schema grammars will be unavailable")
    tools = {t: lib_dir / t for t in TOOL_TARGETS if tools_ok.is_file()}
    if not (lib_dir / _shared_lib_name("llama")).exists():
        raise BuildError(f"the build finished but {lib_dir / _shared_lib_name('llama')} is missing")
    # the manifest beside the libraries, before the self-check: the loader in its children reads it
    result = BuildResult(key=key, build_root=build_root, lib_dir=lib_dir, tools=tools, abi_file=abi_file,
                         source=source, options=options)  # fmt: skip
    (build_root / "build.json").write_text(json.dumps(_manifest(result, options), indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="cpu")
    parser.add_argument("--with-tools", action="store_true", help="also build " + ", ".join(TOOL_TARGETS))
    parser.add_argument("--source", type=Path, help="build this llama.cpp checkout instead of the pinned download")
    parser.add_argument("--allow-unpinned", action="store_true", help="accept a --source that is not the pin")
    parser.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--cache-dir", type=Path, help="default: $ERLLAMA_CACHE_DIR or ~/.cache/erllama")
    parser.add_argument(
        "--cmake-flag",
        action="append",
        default=[],
        dest="cmake_flags",
        metavar="-DX=Y",
        help="extra CMake flag (repeatable; part of the build key)",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--portable", dest="cpu_kind", action="store_const", const="portable",
                      help="CPU kernels for every x86-64 / ARM64 level, the best picked at load time")  # fmt: skip
    kind.add_argument("--native", dest="cpu_kind", action="store_const", const="native",
                      help="CPU kernels compiled for this machine's CPU only (-march=native)")  # fmt: skip
    kind.add_argument("--stock", action="store_true",
                      help="llama.cpp's default build with its tools, unpatched: bench/'s peer")  # fmt: skip
    kind.add_argument("--cpu-level", choices=[*CPU_LEVELS, "lower"],
                      help="a fixed instruction-set level ('lower': one below this CPU's, the tests' second kernel "
                      "set); recorded as current-cpu-LEVEL.json, beside the default build")  # fmt: skip
    parser.add_argument("--deterministic", action="store_true",
                        help="batch-invariant CPU kernels (llamafile off): partial cache hits bit-identical too, "
                        "at a prefill cost (docs/native.md)")  # fmt: skip
    parser.add_argument("--no-prove", action="store_true", help="skip the self-check (the loader then runs it)")
    parser.add_argument("--print-lib-dir", action="store_true", help="print only the library directory")
    parser.add_argument("--ffi-only", action="store_true", help="only regenerate the cffi module")
    parser.add_argument(
        "--print-source-dir", action="store_true", help="fetch (if needed) and print the pristine pinned source tree"
    )
    args = parser.parse_args(argv)
    if args.ffi_only:
        generate_ffi_module()
        return 0
    if args.cmake_flags and not all(re.fullmatch(r"-D[A-Za-z0-9_]+(:[A-Z]+)?=.*", f) for f in args.cmake_flags):
        parser.error("--cmake-flag takes -DNAME=VALUE")
    options = BuildOptions(
        backend=args.backend,
        with_tools=args.with_tools,
        source=args.source,
        allow_unpinned=args.allow_unpinned,
        jobs=args.jobs,
        cache_dir=args.cache_dir,
        extra_cmake_flags=tuple(args.cmake_flags),
        cpu_kind=args.cpu_kind or DEFAULT_CPU_KIND,
        cpu_level=lower_cpu_level() if args.cpu_level == "lower" else args.cpu_level,
        deterministic=args.deterministic,
        stock=args.stock,
        prove=not args.no_prove,
    )
    if args.print_source_dir:
        try:
            print(resolve_source(options).path)
        except BuildError as exc:
            print(f"build_llama: error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        result = ensure_built(options)
    except BuildError as exc:
        print(f"build_llama: error: {exc}", file=sys.stderr)
        return 1
    if not args.print_lib_dir:
        log(f"ABI layouts: {result.abi_file}")
        for name, path in result.tools.items():
            log(f"tool {name}: {path}")
    print(result.lib_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
