"""Models: the backend protocol and its two implementations (llama.cpp and a deterministic stub), and the worker
that serves one.

``ModelWorker`` serves one backend from one thread with continuous batching: its loop plans each step
(``planner``), admits requests (``admission``), decodes and applies the output (``apply``), delivering events
through an outbox (``delivery``), and restores / saves sequences through its ``CacheLink``. ``Supervisor`` restarts
it after crashes; ``Registry`` keeps models by id. The public API over all of this is
:class:`erllama.runtime.Runtime`.

``LlamaBackend`` (and ``kv_layout_params``) load on first use, so the protocol, the stub and the worker import
without the native build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from erllama.model.backend import BackendInfo, DecodeItem, ModelBackend, SamplerConfig, TokenLogprob, token_logprob
from erllama.model.batching import BatchingConfig
from erllama.model.cachelink import Admission, CachedSequence, CacheHit, CacheLink, FinishPlan, SeqCache, namespace_for
from erllama.model.config import WorkerConfig
from erllama.model.delivery import FlushPoint, Outbox, RequestHandle
from erllama.model.events import AdmittedEvent, DoneEvent, ErrorEvent, Event, FinishReason, Phase, TokenEvent
from erllama.model.planner import (
    PlannedSeq,
    PrefillCost,
    StepPlan,
    close_grace_s,
    gather_has_room,
    gather_wait_s,
    plan_step,
)
from erllama.model.registry import LoadedModel, Registry
from erllama.model.request import GenerateRequest
from erllama.model.speculative import verify_draft
from erllama.model.stop import StopMatcher, first_stop
from erllama.model.stub import StubBackend
from erllama.model.supervisor import ModelStatus, Supervisor
from erllama.model.think import ThinkSplitter
from erllama.model.worker import ModelWorker

if TYPE_CHECKING:
    from erllama.model.llama import LlamaBackend, kv_layout_params


def __getattr__(name: str) -> Any:
    if name in ("LlamaBackend", "kv_layout_params"):
        from erllama.model import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'erllama.model' has no attribute {name!r}")


__all__ = [
    "Admission",
    "AdmittedEvent",
    "BackendInfo",
    "BatchingConfig",
    "CacheHit",
    "CacheLink",
    "CachedSequence",
    "DecodeItem",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "FinishPlan",
    "FinishReason",
    "FlushPoint",
    "GenerateRequest",
    "LlamaBackend",
    "LoadedModel",
    "ModelBackend",
    "ModelStatus",
    "ModelWorker",
    "Outbox",
    "Phase",
    "PlannedSeq",
    "PrefillCost",
    "Registry",
    "RequestHandle",
    "SamplerConfig",
    "SeqCache",
    "StepPlan",
    "StopMatcher",
    "StubBackend",
    "Supervisor",
    "ThinkSplitter",
    "TokenEvent",
    "TokenLogprob",
    "WorkerConfig",
    "close_grace_s",
    "first_stop",
    "gather_has_room",
    "gather_wait_s",
    "kv_layout_params",
    "namespace_for",
    "plan_step",
    "token_logprob",
    "verify_draft",
]
