"""Memory samplers: each returns ``(used_bytes, total_bytes)`` of one resource.

* :class:`SystemMemorySampler` — the machine's RAM, as memsup reports it: used = total - available (psutil).
* :class:`NvidiaSampler` — NVIDIA GPU memory summed over all GPUs: NVML through ``nvidia-ml-py`` when it is
  installed and a driver answers, else ``nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,
  nounits`` (MiB per GPU).
* :class:`CallableSampler` — anything else, from a function.

A sampler that cannot read its resource raises :class:`SamplerUnavailableError`; the scheduler reports that and
carries on.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from typing import Protocol

from erllama.errors import ErllamaError

__all__ = [
    "CallableSampler",
    "MemorySampler",
    "NvidiaSampler",
    "SamplerUnavailableError",
    "SystemMemorySampler",
]

_MIB = 1 << 20


class SamplerUnavailableError(ErllamaError, OSError):
    """A memory sampler could not read its resource."""


class MemorySampler(Protocol):
    """A named source of (used, total) bytes."""

    name: str

    def sample(self) -> tuple[int, int]: ...


class SystemMemorySampler:
    """System RAM: used = total - available."""

    name = "system"

    def sample(self) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total - vm.available), int(vm.total)


class CallableSampler:
    """A sampler from a function returning (used, total) bytes."""

    def __init__(self, name: str, fn: Callable[[], tuple[int, int]]) -> None:
        self.name = name
        self._fn = fn

    def sample(self) -> tuple[int, int]:
        used, total = self._fn()
        return int(used), int(total)


class NvidiaSampler:
    """GPU memory summed over every NVIDIA GPU (NVML, else nvidia-smi)."""

    name = "nvidia"

    def __init__(self, nvidia_smi: str = "nvidia-smi", timeout_s: float = 5.0, use_nvml: bool = True) -> None:
        self._smi = nvidia_smi
        self._timeout_s = timeout_s
        self._use_nvml = use_nvml

    def sample(self) -> tuple[int, int]:
        if self._use_nvml:
            nvml = _nvml_sample()
            if nvml is not None:
                return nvml
        return self._smi_sample()

    def _smi_sample(self) -> tuple[int, int]:
        exe = shutil.which(self._smi)
        if exe is None:
            raise SamplerUnavailableError(f"{self._smi} is not on PATH and NVML is unavailable")
        try:
            proc = subprocess.run(
                [exe, "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=self._timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SamplerUnavailableError(f"could not run {exe}: {exc}") from exc
        if proc.returncode != 0:
            raise SamplerUnavailableError(f"{exe} failed ({proc.returncode}): {proc.stderr.strip()[:200]}")
        used = total = 0
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if not lines:
            raise SamplerUnavailableError(f"{exe} reported no GPUs")
        for line in lines:
            try:
                u, t = (int(float(x.strip())) for x in line.split(","))
            except ValueError:
                raise SamplerUnavailableError(f"could not parse nvidia-smi line {line!r}") from None
            used += u * _MIB
            total += t * _MIB
        return used, total


def _nvml_sample() -> tuple[int, int] | None:
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - any NVML failure means "no NVML here"; nvidia-smi is tried next
        return None
    try:
        used = total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            used += int(info.used)
            total += int(info.total)
        return used, total
    finally:
        pynvml.nvmlShutdown()
