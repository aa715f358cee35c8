"""Memory-pressure scheduling: samplers of used/total bytes and a watermark poller that calls evict hooks."""

from erllama.pressure.sampler import (
    CallableSampler,
    MemorySampler,
    NvidiaSampler,
    SamplerUnavailableError,
    SystemMemorySampler,
)
from erllama.pressure.scheduler import EvictHook, PressureConfig, PressureReport, PressureScheduler

__all__ = [
    "CallableSampler",
    "EvictHook",
    "MemorySampler",
    "NvidiaSampler",
    "PressureConfig",
    "PressureReport",
    "PressureScheduler",
    "SamplerUnavailableError",
    "SystemMemorySampler",
]
