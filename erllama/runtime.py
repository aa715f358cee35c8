"""``Runtime``: erllama's public API — load models as supervised workers, complete and stream, keep prompts warm.

A runtime owns a registry of models (each a supervised :class:`~erllama.model.worker.ModelWorker`) and one cache
shared by all of them, kept apart by namespace. Every call names a model by id::

    rt = Runtime()
    model = rt.load_model("smollm2.gguf")
    first = rt.complete(model, "Once upon a time", max_tokens=32)
    again = rt.complete(model, "Once upon a time", max_tokens=32)      # exact hit: restored, not prefilled
    more = rt.complete(model, " and then", parent_key=first.finish_key)  # continues the first context
    for event in rt.infer(model, "Tell me a story"):                    # or `async for` in a coroutine
        ...

The module-level functions of :mod:`erllama` (``erllama.load_model``, ``erllama.complete``, ...) call the same
methods on a process-wide default runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from erllama.cache import CacheStore, FingerprintMode, RamTier, SavePolicy, fingerprint
from erllama.cache.counters import Counters
from erllama.cache.key import CacheKey, Namespace
from erllama.cache.kvc import SaveReason
from erllama.errors import InvalidInputError, NoGpuError, PromptTooLongError, UnknownModelError
from erllama.model.adapters import AdapterInfo, AdapterSet
from erllama.model.backend import BackendInfo, ModelBackend, SamplerConfig, TokenLogprob, token_logprob
from erllama.model.batching import BatchingConfig
from erllama.model.config import WorkerConfig
from erllama.model.registry import LoadedModel, Registry
from erllama.model.request import GenerateRequest
from erllama.model.speculative import verify_draft
from erllama.model.supervisor import ModelStatus
from erllama.model.worker import ModelWorker
from erllama.pressure import PressureScheduler
from erllama.stream import (
    Completion,
    Failed,
    Finished,
    Started,
    Stats,
    Stream,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
)

__all__ = [
    "AdapterInfo",
    "Completion",
    "Failed",
    "Finished",
    "ModelSummary",
    "Runtime",
    "Started",
    "Stats",
    "Stream",
    "StreamEvent",
    "TextDelta",
    "ThinkingDelta",
    "TokenLogprob",
    "VramInfo",
]

DEFAULT_RAM_CACHE_BYTES = 1 << 30
Prompt = str | Sequence[int]


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSummary:
    model_id: str
    status: str
    path: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class VramInfo:
    total_b: int
    free_b: int
    used_b: int
    devices: tuple[str, ...]


class Runtime:
    """Models by id, one shared cache, an optional memory-pressure scheduler.

    Args:
        cache: the shared cache; by default a RAM tier of ``DEFAULT_RAM_CACHE_BYTES``; ``None`` disables caching.
        policy: the default save policy of models loaded here.
        scheduler: a pressure scheduler; each model registers an evict hook with it (freeing cache bytes).
    """

    def __init__(
        self,
        cache: CacheStore | str | None = "default",
        *,
        policy: SavePolicy | None = None,
        scheduler: PressureScheduler | None = None,
    ) -> None:
        if cache == "default":
            self.cache: CacheStore | None = CacheStore([RamTier(DEFAULT_RAM_CACHE_BYTES)])
            self._owns_cache = True
        elif cache is None or isinstance(cache, CacheStore):
            self.cache = cache
            self._owns_cache = False
        else:
            raise InvalidInputError("cache must be a CacheStore, None or 'default'")
        self.policy = policy or SavePolicy()
        self.scheduler = scheduler
        self._registry = Registry()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models -------------------------------------------------------------------------------------------------

    def load_model(
        self,
        path: str | os.PathLike[str] | None = None,
        model_id: str | None = None,
        *,
        backend: Callable[[], ModelBackend] | None = None,
        model_config: Any = None,
        context_config: Any = None,
        fingerprint_mode: FingerprintMode = FingerprintMode.GGUF_CHUNKED,
        fingerprint_value: str | None = None,
        policy: SavePolicy | None = None,
        salt: str = "",
        max_restarts: int = 3,
        window_s: float = 60.0,
        batch_wait_s: float = 0.005,
        batching: BatchingConfig | None = None,
    ) -> str:
        """Load a GGUF (``path``) or a custom backend (``backend``, a factory run on the worker thread) as a
        supervised worker; returns the model id (``model_id`` or a generated one). ``batch_wait_s`` caps how long
        the worker holds a prefill for requests arriving with it (see ``erllama.model.planner.gather_wait_s``; 0
        disables); ``batching`` sets every batching rule instead (:class:`erllama.model.batching.BatchingConfig`)."""
        if (path is None) == (backend is None):
            raise InvalidInputError("load_model needs exactly one of path and backend")
        factory: Callable[[], ModelBackend]
        if path is not None:
            from erllama.model.llama import LlamaBackend

            gguf = os.fspath(path)
            if not Path(gguf).is_file():
                raise InvalidInputError(f"no model file at {gguf}")

            def factory() -> ModelBackend:
                return LlamaBackend(
                    gguf,
                    model_config,
                    context_config,
                    fingerprint_mode=fingerprint_mode,
                    fingerprint_value=fingerprint_value,
                )

        else:
            assert backend is not None
            factory = backend
        adapters = AdapterSet()
        config = WorkerConfig(
            cache=self.cache,
            policy=policy or self.policy,
            salt=salt,
            batching=BatchingConfig(batch_wait_s=batch_wait_s) if batching is None else batching,
            adapters=adapters.specs,
        )
        model_id = self._registry.load(
            factory,
            model_id,
            max_restarts=max_restarts,
            window_s=window_s,
            worker_config=config,
            path=os.fspath(path) if path is not None else None,
            adapters=adapters,
        )
        if self.scheduler is not None and self.cache is not None:
            self.scheduler.register("system", model_id, self.cache.evict_bytes)
        return model_id

    def unload(self, model_id: str) -> None:
        """Stop the model: live sequences get a shutdown save, then its native memory is freed."""
        if self.scheduler is not None:
            self.scheduler.unregister("system", model_id)
        self._registry.unload(model_id)

    unload_model = unload

    def close(self) -> None:
        """Unload every model, then close the cache if this runtime created it."""
        for model_id in list(self._registry.list()):
            with contextlib.suppress(UnknownModelError):
                self.unload(model_id)
        if self.cache is not None and self._owns_cache:
            self.cache.close()

    def _entry(self, model_id: str) -> LoadedModel:
        return self._registry.entry(model_id)

    def _worker(self, model_id: str) -> ModelWorker:
        return self._entry(model_id).supervisor.running_worker()

    def models(self) -> list[str]:
        return sorted(self._registry.list())

    def list_models(self) -> list[ModelSummary]:
        entries = self._registry.entries()
        return [ModelSummary(mid, e.supervisor.status.value, e.path) for mid, e in sorted(entries.items())]

    def model_info(self, model_id: str) -> dict[str, Any]:
        entry = self._entry(model_id)
        worker = entry.supervisor.worker
        info: BackendInfo | None = worker.info if worker is not None else None
        out: dict[str, Any] = {
            "model_id": model_id,
            "path": entry.path,
            "status": entry.supervisor.status.value,
            "restarts": entry.supervisor.restart_count,
            "adapters": [dataclasses.asdict(a) for a in entry.adapters.list()],
        }
        if info is not None:
            out.update(dataclasses.asdict(info))
            out["eog_tokens"] = sorted(info.eog_tokens)
            out["ctx_params"] = dict(info.ctx_params)
        return out

    # -- requests -----------------------------------------------------------------------------------------------

    def infer(
        self,
        model_id: str,
        prompt: Prompt,
        *,
        max_tokens: int | None = 128,
        parent_key: CacheKey | None = None,
        stop: Sequence[str] = (),
        sampling: SamplerConfig | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        seed: int | None = None,
        grammar: str | None = None,
        thinking: bool = False,
        use_cache: bool = True,
        logprobs: int | None = None,
        fit_context: bool = False,
        save_at: Sequence[int] = (),
    ) -> Stream:
        """Start a request and stream it (see :class:`Stream`). A text prompt is tokenized with special tokens
        parsed; with ``parent_key`` the prompt continues that finish key's context. ``logprobs=n`` reports each
        reply token's log-probability and its ``n`` most likely alternatives (:class:`TokenLogprob`).
        ``max_tokens=None`` lets the reply run until the context is full; with ``fit_context`` a ``max_tokens``
        beyond what the context leaves is lowered to that instead of refused (PromptTooLongError). ``save_at``:
        where the prompt is also saved as it is prefilled (offsets in a text prompt, positions in token ids), so
        that a later prompt sharing only that head restores it."""
        config = _sampling(
            sampling,
            {
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "min_p": min_p,
                "repeat_penalty": repeat_penalty,
                "seed": seed,
                "grammar": grammar,
            },
        )
        request = GenerateRequest(
            prompt,
            max_tokens=max_tokens,
            sampling=config,
            stop=tuple(stop),
            parent_key=parent_key,
            use_cache=use_cache,
            logprobs=logprobs,
            fit_context=fit_context,
            thinking=thinking,
            save_at=save_at,
        )
        return Stream(self._entry(model_id).supervisor.submit(request), request.thinking)

    def complete(
        self, model_id: str, prompt: Prompt, /, *, timeout_s: float | None = None, **params: Any
    ) -> Completion:
        """Run a request to the end (parameters as for :meth:`infer`)."""
        return self.infer(model_id, prompt, **params).result(timeout_s)

    async def acomplete(self, model_id: str, prompt: Prompt, /, **params: Any) -> Completion:
        """:meth:`complete` for coroutines (the wait does not block the event loop)."""
        stream = self.infer(model_id, prompt, **params)
        async for event in stream:
            if isinstance(event, Failed):
                raise event.error
        assert stream.completion is not None
        return stream.completion

    def prefill_only(
        self, model_id: str, prompt: Prompt, *, parent_key: CacheKey | None = None, timeout_s: float | None = None
    ) -> Completion:
        """Decode the prompt into the KV cache and save it without sampling; returns its finish_key."""
        return self.infer(model_id, prompt, max_tokens=0, parent_key=parent_key).result(timeout_s)

    def cancel(self, stream: Stream) -> None:
        stream.cancel()

    # -- vocabulary, templates, embeddings ---------------------------------------------------------------------

    def tokenize(self, model_id: str, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._worker(model_id).call(
            lambda b: b.tokenize(text, add_special=add_special, parse_special=parse_special)
        )

    def token_pieces(self, model_id: str, tokens: Sequence[int], *, special: bool = True) -> list[bytes]:
        """The bytes each token renders as (a piece may be part of a UTF-8 character), in one worker call."""
        toks = [int(t) for t in tokens]
        return self._worker(model_id).call(lambda b: [b.token_to_piece(t, special=special) for t in toks])

    def detokenize(self, model_id: str, tokens: Sequence[int]) -> str:
        toks = [int(t) for t in tokens]
        pieces = self._worker(model_id).call(lambda b: b"".join(b.token_to_piece(t) for t in toks))
        return pieces.decode("utf-8", "replace")

    def apply_chat_template(
        self,
        model_id: str,
        messages: Sequence[Mapping[str, str]] | Sequence[tuple[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render messages ({"role", "content"} mappings or (role, content) pairs) with the model's template."""
        pairs = [(m["role"], m["content"]) if isinstance(m, Mapping) else (m[0], m[1]) for m in messages]
        return self._worker(model_id).call(lambda b: b.apply_chat_template(pairs, add_assistant=add_generation_prompt))

    def embed(self, model_id: str, prompt: Prompt) -> list[float]:
        """A mean-pooled, L2-normalised embedding of the prompt."""

        def run(b: ModelBackend, seq_id: int) -> list[float]:
            tokens = b.tokenize(prompt, parse_special=True) if isinstance(prompt, str) else list(prompt)
            if len(tokens) > b.info.n_ctx_seq:
                raise InvalidInputError(
                    f"input of {len(tokens)} tokens is too large for the {b.info.n_ctx_seq}-token context"
                )
            return [float(x) for x in b.embed(seq_id, tokens)]

        return self._worker(model_id).call_with_seq(run)

    def prompt_logprobs(
        self, model_id: str, prompt: Prompt, top_n: int = 0
    ) -> list[tuple[int, bytes, TokenLogprob | None]]:
        """Score a prompt: for each of its tokens (a text is tokenized as :meth:`infer` does), the token, its piece
        and its :class:`TokenLogprob` given the tokens before it with the ``top_n`` most likely alternatives; None
        for the first token, which has no context. One forward pass over the prompt with an output at every
        position (no cache: restored rows carry no logits)."""
        if top_n < 0:
            raise InvalidInputError("top_n must be >= 0")

        def run(b: ModelBackend, seq_id: int) -> list[tuple[int, bytes, TokenLogprob | None]]:
            tokens = b.tokenize(prompt, parse_special=True) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not tokens:
                raise InvalidInputError("the prompt tokenizes to nothing")
            if len(tokens) > b.info.n_ctx_seq:
                raise PromptTooLongError(len(tokens), None, b.info.n_ctx_seq)

            def piece(t: int) -> bytes:
                return b.token_to_piece(t, special=True)

            out: list[tuple[int, bytes, TokenLogprob | None]] = [(tokens[0], piece(tokens[0]), None)]
            for i, row in enumerate(b.logits_rows(seq_id, tokens[:-1])):
                lp = token_logprob(row, tokens[i + 1], top_n, piece)
                out.append((lp.token, lp.piece, lp))
            return out

        return self._worker(model_id).call_with_seq(run, timeout_s=None)

    # -- speculative decoding primitives -----------------------------------------------------------------------

    def draft_tokens(self, model_id: str, prefix: Sequence[int], max_tokens: int = 4) -> list[int]:
        """Up to ``max_tokens`` greedy next tokens after ``prefix`` (fewer at an end token)."""
        return list(self.complete(model_id, list(prefix), max_tokens=max_tokens, temperature=0.0).generated)

    def verify(
        self, model_id: str, prefix: Sequence[int], candidates: Sequence[int], k: int | None = None
    ) -> tuple[int, int | None]:
        """Check draft ``candidates`` after ``prefix`` in one forward pass: returns how many the model accepts
        (its own greedy choice agrees) and its next token after them (None for an end-of-generation token)."""
        cands = [int(t) for t in candidates][: k if k is not None else len(candidates)]
        toks = [int(t) for t in prefix]
        if not toks:
            raise InvalidInputError("verify needs a non-empty prefix")
        worker = self._worker(model_id)
        return worker.call_with_seq(lambda b, seq_id: verify_draft(b, seq_id, worker.link, toks, cands))

    # -- cache --------------------------------------------------------------------------------------------------

    def evict(self, model_id: str, timeout_s: float = 10.0) -> int:
        """Save the live state of the model's active sequences now (evict saves); returns rows written."""
        return self._worker(model_id).save_live(SaveReason.EVICT, timeout_s)

    def shutdown(self, model_id: str, timeout_s: float = 10.0) -> int:
        """Fire the shutdown save of the model's active sequences and return once it is published."""
        return self._worker(model_id).save_live(SaveReason.SHUTDOWN, timeout_s)

    def list_cached_prefixes(self, model_id: str, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` are cached for this model (its current adapters included)."""
        link = self._worker(model_id).link
        return link.probe([int(t) for t in tokens]) if link is not None and tokens else 0

    def kv_usage(self, model_id: str) -> float:
        """The share of the model's KV cells the running requests hold, 0..1 (vLLM's ``kv_cache_usage_perc``)."""
        worker = self._worker(model_id)
        info = worker.info
        cells = info.n_ctx_seq * info.n_seq_max if info is not None else 0
        return min(1.0, worker.kv_used / cells) if cells > 0 else 0.0

    def cache_namespace(self, model_id: str) -> Namespace | None:
        """The cache namespace the model's requests run in now (its file, KV layout, adapters); None without a
        cache. Rows of other namespaces are never restored into it."""
        link = self._worker(model_id).link
        return None if link is None else link.namespace

    def counters(self) -> dict[str, float]:
        return self.cache.counters.snapshot() if self.cache is not None else Counters().snapshot()

    # -- live state ---------------------------------------------------------------------------------------------

    def status(self, model_id: str) -> str:
        """running | restarting | failed | stopped."""
        return self._entry(model_id).supervisor.status.value

    def phase(self, model_id: str) -> str:
        """idle | prefilling | generating (idle when the model is not running)."""
        worker = self._entry(model_id).supervisor.worker
        return worker.phase.value if worker is not None else "idle"

    def pending_len(self, model_id: str) -> int:
        """Prompt tokens still to prefill over the model's active requests."""
        worker = self._entry(model_id).supervisor.worker
        return worker.pending_len if worker is not None else 0

    def queue_depth(self, model_id: str) -> int:
        """Requests waiting for a free sequence."""
        worker = self._entry(model_id).supervisor.worker
        return worker.queue_depth if worker is not None else 0

    def in_flight(self, model_id: str) -> int:
        worker = self._entry(model_id).supervisor.worker
        return worker.in_flight if worker is not None else 0

    def last_cache_hit(self, model_id: str) -> dict[str, Any] | None:
        """``{"kind": exact | partial | cold, "prefix_len": n}`` of the latest admission, or None."""
        worker = self._entry(model_id).supervisor.worker
        hit = worker.last_hit if worker is not None else None
        return None if hit is None else {"kind": hit.kind, "prefix_len": hit.prefix_len}

    # -- adapters -----------------------------------------------------------------------------------------------

    def load_adapter(
        self, model_id: str, path: str | os.PathLike[str], scale: float = 1.0, name: str | None = None
    ) -> str:
        """Attach a LoRA adapter; adapters and their scales split the cache namespace. Returns its name."""
        entry = self._entry(model_id)
        p = os.fspath(path)
        if not Path(p).is_file():
            raise InvalidInputError(f"no adapter file at {p}")
        name = name or Path(p).stem
        with entry.adapters.lock:
            undo = entry.adapters.add(AdapterInfo(name, p, float(scale)), fingerprint(p, FingerprintMode.SAFE))
            self._reapply(entry, undo)
        return name

    def set_adapter_scale(self, model_id: str, name: str, scale: float) -> None:
        entry = self._entry(model_id)
        with entry.adapters.lock:
            self._reapply(entry, entry.adapters.set_scale(name, float(scale)))

    def unload_adapter(self, model_id: str, name: str) -> None:
        entry = self._entry(model_id)
        with entry.adapters.lock:
            self._reapply(entry, entry.adapters.remove(name))

    def list_adapters(self, model_id: str) -> list[AdapterInfo]:
        return self._entry(model_id).adapters.list()

    @staticmethod
    def _reapply(entry: LoadedModel, undo: Callable[[], object]) -> None:
        """Have the worker apply the adapters as they are now; undo the change if it cannot."""
        try:
            entry.supervisor.running_worker().reapply_adapters()
        except BaseException:
            undo()
            raise

    # -- devices ------------------------------------------------------------------------------------------------

    @staticmethod
    def vram_info() -> VramInfo:
        """GPU memory summed over every GPU device libllama sees; NoGpuError on CPU-only builds or machines."""
        from erllama._native import library

        lib = library()
        devices = lib.gpu_devices()
        if not devices:
            raise NoGpuError(f"libllama is a {lib.backend} build and sees no GPU device")
        total = sum(d.total_bytes for d in devices)
        free = sum(d.free_bytes for d in devices)
        return VramInfo(total, free, total - free, tuple(d.name for d in devices))

    def model_status(self, model_id: str) -> ModelStatus:
        return self._entry(model_id).supervisor.status


def _sampling(base: SamplerConfig | None, changes: Mapping[str, Any]) -> SamplerConfig:
    """``base`` (or the default: greedy) with the given fields replaced; None values leave a field alone."""
    given: dict[str, Any] = {name: value for name, value in changes.items() if value is not None}
    return dataclasses.replace(base or SamplerConfig(), **given)
