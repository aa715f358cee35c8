"""Finding, loading and checking libllama: the process-wide half of the binding.

The library is ``dlopen``-ed once per process (thread-safe), from ``$ERLLAMA_LIB_DIR`` or else from the build that
``build_llama.py`` recorded in its cache. Before any model is touched the loader

* sets ``GGML_NO_BACKTRACE`` so a failed ggml assertion never forks a debugger to print a backtrace;
* compares the ABI probe's layouts (``abi.json`` beside the libraries) with cffi's, refusing a library whose
  structs differ from the cdef;
* in a portable build (ggml's CPU backend as one library per instruction-set variant), scores the variants for this
  CPU and registers the best one (or ``$ERLLAMA_CPU_VARIANT``);
* refuses a CPU kernel set that has not passed its self-check on this CPU (``selfcheck``): a smoke decode in a
  child process, compared with a NumPy reference. build_llama.py runs it after building; a build copied to another
  machine is checked there on first load. A failed variant is skipped for the next best one; a native build that
  failed is refused with an error that names the fix;
* calls ``llama_backend_init`` and routes llama.cpp's log callback into the ``erllama.llama`` logger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import cffi

from erllama._native import errcheck
from erllama.errors import LibraryError

try:
    from erllama._native._llama_ffi import ffi
except ImportError as exc:  # pragma: no cover - only before the first build
    raise LibraryError(
        "erllama's cffi module has not been generated yet; run `python build_llama.py` from the source tree"
    ) from exc

__all__ = [
    "CpuVariant",
    "GpuDevice",
    "Library",
    "abi_mismatches",
    "cpu_variants",
    "ffi",
    "lib",
    "library",
    "library_dir",
    "loaded_library",
]

log = logging.getLogger("erllama.llama")

_LOG_LEVELS = {
    0: logging.DEBUG,  # GGML_LOG_LEVEL_NONE
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
_LOG_CONT = 5


@dataclasses.dataclass(frozen=True, slots=True)
class Library:
    """The loaded libllama and where it came from."""

    lib: Any
    lib_dir: Path
    abi_file: Path | None
    manifest: dict[str, Any]
    cpu_variant: str = "native"
    """The CPU kernel set in use: a portable build's variant (``zen4``, ``haswell``, ...), a fixed level's name, or
    ``native`` for a build compiled for this CPU."""
    selfcheck: str = "skipped"
    """How the kernel set was proven on this CPU: ``passed`` (with its error), ``skipped`` (ERLLAMA_SKIP_SELFCHECK or a
    GPU build), ``child`` (this process is a self-check)."""

    @property
    def build(self) -> dict[str, Any]:
        """What ``erllama version``, ``ps`` and ``/metrics`` report about the build."""
        return {
            "backend": self.backend,
            "flavor": self.manifest.get("flavor"),
            "cpu_variant": self.cpu_variant,
            "selfcheck": self.selfcheck,
            "deterministic": self.batch_invariant,
            "patches": [p.get("name") for p in self.manifest.get("patches", [])],
            "source_id": self.manifest.get("source_id"),
            "lib_dir": str(self.lib_dir),
        }

    @property
    def backend(self) -> str:
        """``cpu``, ``cuda`` or ``metal`` as recorded by build_llama.py; for an unrecorded set, ``gpu`` when ggml
        reports a GPU device and ``cpu`` otherwise."""
        recorded = self.manifest.get("backend")
        if recorded:
            return str(recorded)
        gpu_types = (1, 2)  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
        n = int(self.lib.ggml_backend_dev_count())
        has_gpu = any(
            int(self.lib.ggml_backend_dev_type(self.lib.ggml_backend_dev_get(i))) in gpu_types for i in range(n)
        )
        return "gpu" if has_gpu else "cpu"

    @property
    def batch_invariant(self) -> bool:
        """Whether this is a CPU build whose kernels compute a token the same way in any batch (see build_llama.py:
        llamafile's sgemm off). Restored and resumed sequences then match cold runs bit for bit."""
        flags = [str(f) for f in self.manifest.get("cmake_flags", [])]
        return self.backend == "cpu" and "-DGGML_LLAMAFILE=OFF" in flags and "-DGGML_LLAMAFILE=ON" not in flags

    def gpu_devices(self) -> list[GpuDevice]:
        """Every GPU device ggml sees, with its free and total memory (empty on CPU builds)."""
        out = []
        for i in range(int(self.lib.ggml_backend_dev_count())):
            dev = self.lib.ggml_backend_dev_get(i)
            if int(self.lib.ggml_backend_dev_type(dev)) not in (1, 2):  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
                continue
            free, total = ffi.new("size_t *"), ffi.new("size_t *")
            self.lib.ggml_backend_dev_memory(dev, free, total)
            name = ffi.string(self.lib.ggml_backend_dev_name(dev)).decode("utf-8", "replace")
            out.append(GpuDevice(name, int(free[0]), int(total[0])))
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class GpuDevice:
    name: str
    free_bytes: int
    total_bytes: int


def _cache_root() -> Path:
    env = os.environ.get("ERLLAMA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "erllama"


def library_dir() -> tuple[Path, dict[str, Any]]:
    """Where the libraries are: ``$ERLLAMA_LIB_DIR``, else the build recorded by build_llama.py."""
    env = os.environ.get("ERLLAMA_LIB_DIR")
    if env:
        lib_dir = Path(env).expanduser()
        manifest_file = lib_dir.parent.parent / "build.json"
        manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        return lib_dir, manifest
    backend = os.environ.get("ERLLAMA_BACKEND")
    current = _cache_root() / "llama" / (f"current-{backend}.json" if backend else "current.json")
    if not current.is_file():
        raise LibraryError(
            f"no libllama build found ({current} is missing); run `python build_llama.py` or set ERLLAMA_LIB_DIR"
        )
    manifest = json.loads(current.read_text())
    return Path(manifest["lib_dir"]), manifest


def abi_mismatches(abi: dict[str, Any]) -> list[str]:
    """Differences between the probe's recorded layouts and cffi's view of the cdef (empty when they agree)."""
    problems = []
    structs: dict[str, dict[str, Any]] = abi["structs"]
    _typedefs, names, _unions = ffi.list_types()
    for name in names:
        ctype = ffi.typeof(f"struct {name}")
        try:
            size = ffi.sizeof(ctype)  # also completes cffi's lazy layout before .fields is read
        except ffi.error:
            continue  # opaque: only ever handled through pointers
        key = f"struct {name}"
        if key not in structs:
            problems.append(f"{key}: not measured by the ABI probe")
            continue
        probe = structs[key]
        if probe["sizeof"] != size:
            problems.append(f"{key}: sizeof is {probe['sizeof']} in C, {size} in the cdef")
        for field, _ in ctype.fields:
            c_off = probe["offsetof"].get(field)
            py_off = ffi.offsetof(ctype, field)
            if c_off != py_off:
                problems.append(f"{key}.{field}: offset {c_off} in C, {py_off} in the cdef")
    return problems


def _dlopen_all(lib_dir: Path) -> Any:
    """Open the ggml libraries first (base, backends, ggml), then libllama, so a relocated set still resolves."""
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    main = lib_dir / f"libllama{suffix}"
    if not main.exists():
        raise LibraryError(f"{main} does not exist; run `python build_llama.py` or fix ERLLAMA_LIB_DIR")
    variants = {p.name for p in variant_files(lib_dir).values()}
    ggml = sorted(p for p in lib_dir.glob(f"libggml*{suffix}") if p.name not in variants)
    order = (
        [p for p in ggml if p.name == f"libggml-base{suffix}"]
        + [p for p in ggml if p.name not in (f"libggml-base{suffix}", f"libggml{suffix}")]
        + [p for p in ggml if p.name == f"libggml{suffix}"]
    )
    flags = ffi.RTLD_NOW | ffi.RTLD_GLOBAL
    try:
        deps = [ffi.dlopen(str(p), flags) for p in order]
        handle = ffi.dlopen(str(main), flags)
    except OSError as exc:
        raise LibraryError(f"could not load libllama from {lib_dir}: {exc}") from exc
    _keepalive.extend(deps)
    return handle


@dataclasses.dataclass(frozen=True, slots=True)
class CpuVariant:
    """One CPU kernel library of a portable build and how well it suits this CPU (0: it cannot run here)."""

    name: str
    path: Path
    score: int


def variant_files(lib_dir: Path) -> dict[str, Path]:
    """A portable build's CPU variant libraries by name (``libggml-cpu-haswell.so`` -> ``haswell``)."""
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    prefix = "libggml-cpu-"
    return {p.name[len(prefix) : -len(suffix)]: p for p in sorted(lib_dir.glob(f"{prefix}*{suffix}"))}


_score_ffi = cffi.FFI()
_score_ffi.cdef("int ggml_backend_score(void);")


def cpu_variants(lib_dir: Path) -> list[CpuVariant]:
    """The CPU variants of a portable build, best first, each scored by its own ``ggml_backend_score`` (what
    llama.cpp's ``ggml_backend_load_best`` does); empty for a build with one CPU backend linked in. The ggml base
    library must be loaded first (``_dlopen_all``)."""
    out = []
    for name, path in variant_files(lib_dir).items():
        try:
            handle = _score_ffi.dlopen(str(path), _score_ffi.RTLD_NOW | _score_ffi.RTLD_LOCAL)
        except OSError as exc:
            log.warning("skipping CPU variant %s: %s", name, exc)
            continue
        try:
            score = int(handle.ggml_backend_score())
        except AttributeError:
            score = 0
        finally:
            _score_ffi.dlclose(handle)
        out.append(CpuVariant(name, path, score))
    return sorted(out, key=lambda v: -v.score)


def _choose_cpu_variant(handle: Any, lib_dir: Path, manifest: dict[str, Any]) -> tuple[str, str]:
    """Register the CPU kernels to use and say which (and how they were proven)."""
    from erllama._native import selfcheck

    variants = cpu_variants(lib_dir)
    forced = os.environ.get("ERLLAMA_CPU_VARIANT") or None
    gated = selfcheck.gate_enabled(manifest)
    if not variants:
        name = str(manifest.get("cpu_kind") or "native")
        if forced not in (None, name):
            raise LibraryError(f"ERLLAMA_CPU_VARIANT={forced}, but {lib_dir} is a {name} build without CPU variants")
        if not gated:
            return name, "child" if selfcheck.in_child() else "skipped"
        verdict = selfcheck.verdict(lib_dir, name)
        if not verdict.ok:
            raise LibraryError(
                f"the CPU kernels of {lib_dir} ({name}) failed their self-check on this CPU: {verdict.detail}. "
                "Rebuild with `python build_llama.py` (it falls back to a build without the failing instruction set) "
                "or `python build_llama.py --portable`; ERLLAMA_SKIP_SELFCHECK=1 loads it anyway"
            )
        return name, verdict.describe()
    candidates = [v for v in variants if v.score > 0]
    if forced is not None:
        match = [v for v in variants if v.name == forced]
        if not match:
            raise LibraryError(f"ERLLAMA_CPU_VARIANT={forced}: no such variant in {lib_dir} "
                               f"({', '.join(v.name for v in variants)})")  # fmt: skip
        if match[0].score <= 0:
            raise LibraryError(f"ERLLAMA_CPU_VARIANT={forced}: this CPU lacks instructions that variant needs")
        candidates = match
    refused = []
    for variant in candidates:
        how = "child" if selfcheck.in_child() else "skipped"
        if gated:
            verdict = selfcheck.verdict(lib_dir, variant.name)
            if not verdict.ok:
                log.warning("CPU variant %s failed its self-check here (%s); trying the next", variant.name,
                            verdict.detail)  # fmt: skip
                refused.append(f"{variant.name}: {verdict.detail}")
                continue
            how = verdict.describe()
        if handle.ggml_backend_load(str(variant.path).encode()) == ffi.NULL:
            raise LibraryError(f"ggml could not load the CPU variant {variant.path}: {errcheck.last_error('')}")
        return variant.name, how
    raise LibraryError(
        f"no CPU variant of {lib_dir} passed its self-check on this CPU ({'; '.join(refused) or 'none can run here'}); "
        "rebuild with `python build_llama.py`, or set ERLLAMA_SKIP_SELFCHECK=1 to load one anyway"
    )


# cffi objects that must outlive every call into the library: dependency handles and the log callback.
_keepalive: list[Any] = []
_lock = threading.Lock()
_library: Library | None = None
_pending_line: dict[int, tuple[int, str]] = {}


def _on_log(level: int, text: Any, _user_data: Any) -> None:
    # Called by llama.cpp on whatever thread logs. A line may arrive in pieces: the first carries the level, the
    # rest come as GGML_LOG_LEVEL_CONT; pieces are joined per thread until the newline.
    message = ffi.string(text).decode("utf-8", "replace")
    tid = threading.get_ident()
    pending = _pending_line.pop(tid, None)
    if level == _LOG_CONT:
        level, message = (pending[0], pending[1] + message) if pending else (1, message)
    elif pending is not None:
        _emit(*pending)
    if message.endswith("\n"):
        _emit(level, message)
    else:
        _pending_line[tid] = (level, message)


def _emit(level: int, message: str) -> None:
    py_level = _LOG_LEVELS.get(level, logging.INFO)
    if py_level >= logging.WARNING:
        errcheck.record(message)
    if log.isEnabledFor(py_level):
        log.log(py_level, "%s", message.rstrip())


def _load() -> Library:
    # Never let a ggml assertion fork gdb/lldb to print a backtrace; it must fail fast.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    lib_dir, manifest = library_dir()
    abi_file = lib_dir / "abi.json"
    if abi_file.is_file():
        problems = abi_mismatches(json.loads(abi_file.read_text()))
        if problems:
            raise LibraryError("libllama's ABI does not match native/llama.cdef:\n  " + "\n  ".join(problems))
    elif os.environ.get("ERLLAMA_SKIP_ABI_CHECK") != "1":
        raise LibraryError(f"{abi_file} is missing: rebuild with build_llama.py (or set ERLLAMA_SKIP_ABI_CHECK=1)")
    lib = _dlopen_all(lib_dir)
    callback = ffi.callback("ggml_log_callback", _on_log)
    _keepalive.append(callback)
    lib.llama_log_set(callback, ffi.NULL)
    variant, proof = _choose_cpu_variant(lib, lib_dir, manifest)
    lib.llama_backend_init()
    return Library(lib=lib, lib_dir=lib_dir, abi_file=abi_file if abi_file.is_file() else None, manifest=manifest,
                   cpu_variant=variant, selfcheck=proof)  # fmt: skip


def library() -> Library:
    """The process-wide library, loaded on first use."""
    global _library  # noqa: PLW0603 - the process-wide singleton, guarded by _lock
    if _library is None:
        with _lock:
            if _library is None:
                _library = _load()
    return _library


def loaded_library() -> Library | None:
    """The library if this process has loaded it (never loads it)."""
    return _library


def lib() -> Any:
    """The cffi library object (``lib().llama_decode(...)``)."""
    return library().lib
