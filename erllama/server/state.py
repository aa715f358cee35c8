"""What every route of the daemon shares: the runtime, the served models (loaded on demand, unloaded after their
keep-alive), the per-model queue limits, the chat engine and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from fastapi import Depends, Request

from erllama.chat import ChatEngine
from erllama.chat.stable import StableOptions
from erllama.errors import InvalidInputError, OverloadedError, UnknownModelError, WorkerStoppedError
from erllama.runtime import Runtime
from erllama.server.metrics import LiveView, Metrics
from erllama.text import utf8

__all__ = ["ManagedSource", "ModelSource", "ServerConfig", "ServerState"]

log = logging.getLogger("erllama.server")

_FANOUT_HELD: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("fanout", default=frozenset())
_FOREVER_S = 1e9  # a keep-alive this long (about 31 years) or longer means "never unload"


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """Limits and access of the daemon.

    Attributes:
        api_key: when set, every request must carry it (``Authorization: Bearer`` or ``x-api-key``).
        stable: which rewrites keep agent clients' prompt prefixes stable (:mod:`erllama.chat.stable`).
        max_body_bytes: larger request bodies are refused with 413.
        max_messages: conversations with more messages are refused with 400.
        default_max_tokens: reply length when a request does not say (None: what the context leaves).
        strict_max_tokens: refuse a request whose prompt + max_tokens exceeds the context (400, as hosted APIs do);
            by default such a max_tokens is lowered to what the context leaves, and the reply ends with the
            dialect's "length" reason when the context is full. A prompt that leaves no room is refused either way.
        max_concurrency: requests a model runs at once (None: as many as it has sequences).
        max_queue: requests that may wait for a model beyond those; more are refused (429 / 503 / 529).
        queue_timeout_s: how long a request waits for a slot before it is refused the same way.
        keep_alive_s: idle seconds after which a model loaded on demand is unloaded (None: never; 0: at once).
        cors_origins: origins allowed by CORS; empty (the default) sends no CORS headers at all.
        allowed_hosts: host names a key-less daemon answers to besides IP addresses and ``localhost`` (the
            ``Host`` header of any other name is refused: a web page cannot drive the daemon by DNS rebinding).
        model_fallback: which requests the default model answers (the one served from startup, else the only
            model there is; with several and none pinned there is no default): ``missing`` (the default), a
            request that names no model, as llama-server answers; ``any``, also one naming a model that does not
            exist (llama-server's clients send any name); ``none``, every request must name a model.
        default_seed: the sampler seed of a request that gives none (llama-server's ``--seed``): the same prompt
            and settings then sample the same reply, streamed or not. None (the default): a fresh seed each time.
        ping_period_s: a streamed Anthropic reply sends a ``ping`` after this long without an event (a long
            prefill), as Anthropic's API does, so proxies and clients do not time the stream out.
        owned_by: the ``owned_by`` of every model ``/v1/models`` lists (gateways route on it).
    """

    api_key: str | None = None
    stable: StableOptions = dataclasses.field(default_factory=StableOptions)
    max_body_bytes: int = 8 << 20
    max_messages: int = 1024
    default_max_tokens: int | None = None
    strict_max_tokens: bool = False
    max_concurrency: int | None = None
    max_queue: int = 64
    queue_timeout_s: float = 60.0
    keep_alive_s: float | None = 300.0
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    model_fallback: Literal["missing", "any", "none"] = "missing"
    default_seed: int | None = None
    ping_period_s: float = 10.0
    owned_by: str = "erllama"


class ModelSource(Protocol):
    """Where models not yet loaded come from (a models directory, the model store)."""

    def available(self) -> Mapping[str, Path]:
        """Loadable models: name -> GGUF path."""
        ...

    def load(self, runtime: Runtime, name: str) -> str:
        """Load ``name`` into ``runtime`` and return its model id. Raises UnknownModelError."""
        ...

    def canonical(self, name: str) -> str | None:
        """The key of ``available()`` that ``name`` means (``smollm2`` -> ``smollm2:135m``), or None."""
        ...


@runtime_checkable
class ManagedSource(ModelSource, Protocol):
    """A source that can also fetch, delete and copy models (Ollama's pull / delete / copy)."""

    def delete(self, name: str) -> None: ...

    def copy(self, source: str, destination: str) -> None: ...

    def pull(self, name: str) -> Iterator[dict[str, Any]]: ...


@dataclasses.dataclass(slots=True)
class _Gate:
    limit: int
    sem: asyncio.Semaphore
    waiting: int = 0
    active: int = 0


@dataclasses.dataclass(slots=True)
class _Loaded:
    model_id: str
    pinned: bool
    keep_alive_s: float | None
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    expires_at: float | None = None


class ServerState:
    """The served models (name -> runtime model id), their queues and keep-alive."""

    def __init__(
        self,
        runtime: Runtime,
        models: Mapping[str, str],
        config: ServerConfig,
        source: ModelSource | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.source = source
        self._aliases: dict[str, str] = {}  # request name -> served name (a bare name -> its only tag)
        self.default_max_tokens = config.default_max_tokens
        self.started = int(time.time())
        self.chat = ChatEngine(runtime)
        self.metrics = Metrics(self.live_view)
        self._loaded = {name: _Loaded(mid, pinned=True, keep_alive_s=None) for name, mid in models.items()}
        self._gates: dict[str, _Gate] = {}
        self._fanouts: dict[str, asyncio.Lock] = {}
        self._load_lock = threading.Lock()

    # -- names ---------------------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Models loaded now."""
        return sorted(self._loaded)

    def available(self) -> dict[str, Path | None]:
        """Every model a request may name: loaded ones (path None when not from the source) and loadable ones."""
        out: dict[str, Path | None] = dict.fromkeys(self._loaded)
        if self.source is not None:
            out.update(self.source.available())
        return out

    def canonical(self, name: str) -> str:
        """The name ``name`` is served under: itself when loaded, else what the source says it means."""
        if name in self._loaded or self.source is None:
            return name
        alias = self._aliases.get(name)
        if alias is not None and alias in self._loaded:
            return alias  # no store lookup on the request path while the model stays loaded
        found = self.source.canonical(name) or name
        if found != name:
            self._aliases[name] = found
        return found

    def resolve(self, name: str) -> str:
        """The model id of a loaded model."""
        entry = self._loaded.get(name)
        if entry is None:
            raise UnknownModelError(f"The model '{name}' does not exist")
        return entry.model_id

    def loaded(self) -> dict[str, tuple[str, float | None]]:
        """Loaded models: name -> (model id, unload deadline as a wall-clock time or None)."""
        now_m, now_w = time.monotonic(), time.time()
        return {
            n: (e.model_id, None if e.expires_at is None else now_w + (e.expires_at - now_m))
            for n, e in self._loaded.items()
        }

    def default_model(self) -> str | None:
        """The model a request that names none (or, with ``model_fallback="any"``, an unknown one) gets: the one
        served from startup, else the only model there is."""
        pinned = [n for n, e in self._loaded.items() if e.pinned]
        if len(pinned) == 1:
            return pinned[0]
        if pinned:
            return None
        names = list(self._loaded) if self.source is None else list(self.available())
        return names[0] if len(names) == 1 else None

    def served_name(self, name: str | None) -> str:
        """The served name a request's ``model`` means, the fallback applied (see ``ServerConfig.model_fallback``).
        Raises InvalidInputError (no name and no default) or UnknownModelError."""
        policy = self.config.model_fallback
        if not name or not isinstance(name, str):
            fallback = self.default_model() if policy != "none" else None
            if fallback is None:
                raise InvalidInputError("a model name is required")
            return fallback
        utf8(name, "the model name")  # a lone surrogate: a 400 (it would not even fit in the error's JSON)
        served = self.canonical(name)
        if served in self._loaded or (self.source is not None and served in self.source.available()):
            return served
        fallback = self.default_model() if policy == "any" else None
        if fallback is None:
            raise UnknownModelError(f"The model '{name}' does not exist")
        return fallback

    async def ensure_loaded(self, name: str | None, keep_alive_s: float | str | None = "default") -> str:
        """The model id of ``name``, loading it from the source when needed (off the event loop)."""
        name = self.served_name(name)
        entry = self._loaded.get(name)
        if entry is None:
            entry = await asyncio.to_thread(self._load, name)
        self.touch(name, keep_alive_s)
        return entry.model_id

    def _load(self, name: str) -> _Loaded:
        with self._load_lock:
            entry = self._loaded.get(name)
            if entry is None:
                assert self.source is not None
                log.info("loading model %s", name)
                model_id = self.source.load(self.runtime, name)
                entry = self._loaded[name] = _Loaded(model_id, pinned=False, keep_alive_s=self.config.keep_alive_s)
            return entry

    def touch(self, name: str, keep_alive_s: float | str | None = "default") -> None:
        """Mark ``name`` used now; an explicit ``keep_alive_s`` replaces its keep-alive (None: forever)."""
        entry = self._loaded.get(name)
        if entry is None:
            return
        if keep_alive_s != "default" and not entry.pinned:  # a model served from startup stays, whatever a request says
            seconds = None if keep_alive_s is None else float(keep_alive_s)
            # negative, or longer than anyone waits (1e13 s overflows a datetime): forever
            entry.keep_alive_s = None if seconds is None or not 0 <= seconds < _FOREVER_S else seconds
        entry.last_used = time.monotonic()
        entry.expires_at = None if entry.pinned or entry.keep_alive_s is None else entry.last_used + entry.keep_alive_s

    def pinned(self, name: str) -> bool:
        """Whether ``name`` is served from startup (``--model``): no request unloads or deletes it."""
        entry = self._loaded.get(self.canonical(name))
        return entry is not None and entry.pinned

    async def unload(self, name: str) -> bool:
        """Unload ``name`` now (False when it was not loaded). A model served from startup is not unloaded:
        InvalidInputError."""
        if self.pinned(name):
            raise InvalidInputError(f"model '{name}' is served from startup and stays loaded until the server stops")
        entry = self._loaded.pop(self.canonical(name), None)
        if entry is None:
            return False
        self._gates.pop(entry.model_id, None)
        await asyncio.to_thread(self.runtime.unload, entry.model_id)
        return True

    async def reap(self) -> list[str]:
        """Unload models whose keep-alive ran out and that nothing uses; their names."""
        now = time.monotonic()
        gone = []
        for name, entry in list(self._loaded.items()):
            gate = self._gates.get(entry.model_id)
            busy = gate is not None and (gate.active or gate.waiting)
            if entry.expires_at is not None and entry.expires_at <= now and not busy:
                await self.unload(name)
                gone.append(name)
        return gone

    async def reaper(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.reap()
            except Exception:  # a failed unload must not stop the reaper
                log.exception("unloading idle models failed")

    # -- queue limits --------------------------------------------------------------------------------------

    def _gate(self, model_id: str) -> _Gate:
        gate = self._gates.get(model_id)
        if gate is None:
            limit = self.config.max_concurrency
            if limit is None:
                limit = int(self.runtime.model_info(model_id).get("n_seq_max") or 1)
            gate = self._gates[model_id] = _Gate(limit, asyncio.Semaphore(limit))
        return gate

    async def acquire(self, model_id: str) -> Callable[[], None]:
        """Wait for one of the model's slots; the returned function gives it back (idempotent).

        The queue bound is checked and the request counted in one step, before any ``await``: requests that
        arrive together cannot all pass a check that none of them has raised the count for yet.

        Raises:
            WorkerStoppedError: the model is failed or stopped (at once, not after a queue timeout).
            OverloadedError: the queue is full, or no slot came within ``queue_timeout_s``.
        """
        status = self.runtime.status(model_id)
        if status in ("failed", "stopped"):
            self.metrics.rejected.labels(reason=f"model_{status}").inc()
            raise WorkerStoppedError(f"model {model_id} is {status}")
        gate = self._gate(model_id)
        if gate.waiting + gate.active >= gate.limit + self.config.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise OverloadedError(f"model is busy: {gate.waiting} requests already waiting", retry_after=1.0)
        gate.waiting += 1
        try:
            await asyncio.wait_for(gate.sem.acquire(), self.config.queue_timeout_s)
        except TimeoutError:
            self.metrics.rejected.labels(reason="queue_timeout").inc()
            raise OverloadedError(
                f"model is busy: no slot within {self.config.queue_timeout_s:g} s", retry_after=1.0
            ) from None
        finally:
            gate.waiting -= 1
        gate.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                gate.active -= 1
                gate.sem.release()
                for entry in self._loaded.values():
                    if entry.model_id == model_id:
                        entry.last_used = time.monotonic()
                        if entry.keep_alive_s is not None and not entry.pinned:
                            entry.expires_at = entry.last_used + entry.keep_alive_s

        return release

    def slots(self, model_id: str) -> int:
        """Requests the model runs at once."""
        return self._gate(model_id).limit

    def check_choices(self, model_id: str, n: int) -> None:
        """A request's replies (prompts x ``n``) all run at once, each in a slot: no more than the model has.
        Raises InvalidInputError (more would wait for slots that only their own request frees)."""
        limit = self.slots(model_id)
        if n > limit:
            raise InvalidInputError(
                f"the request asks for {n} replies (prompts x n); this model runs {limit} at once: send fewer"
            )

    @contextlib.asynccontextmanager
    async def fanout(self, model_id: str, n: int) -> AsyncIterator[None]:
        """Held while a request takes ``n`` slots one by one (OpenAI's ``n``): two such requests cannot each hold
        part of the slots the other waits for. Single-slot requests never wait on it."""
        held = _FANOUT_HELD.get()
        if n <= 1 or model_id in held:  # one slot, or already held by this request (a list of prompts)
            yield
            return
        lock = self._fanouts.setdefault(model_id, asyncio.Lock())
        async with lock:
            token = _FANOUT_HELD.set(held | {model_id})
            try:
                yield
            finally:
                _FANOUT_HELD.reset(token)

    def queue_depth(self, model_id: str) -> tuple[int, int]:
        """(waiting, running) requests of a model."""
        gate = self._gates.get(model_id)
        return (gate.waiting, gate.active) if gate is not None else (0, 0)

    def live_view(self) -> LiveView:
        """What ``/metrics`` reads at a scrape: queues per loaded model, models, cache tiers and counters."""
        queues = tuple((name, *self.queue_depth(model_id)) for name, (model_id, _) in self.loaded().items())
        cache = self.runtime.cache
        tiers = tuple(
            (t.name, t.used_bytes, t.budget_bytes, len(t)) for t in (cache.tiers if cache is not None else ())
        )
        kv = tuple((name, self.runtime.kv_usage(model_id)) for name, (model_id, _) in self.loaded().items())
        tokens = tuple(cache.tier_tokens().items()) if cache is not None else ()
        return LiveView(queues, len(self.model_names()), tiers, self.runtime.counters(), kv, tokens)


def server_state(request: Request) -> ServerState:
    """The server's state, for a route (a FastAPI dependency: ``state: StateDep``)."""
    state: ServerState = request.app.state.erllama
    return state


StateDep = Annotated[ServerState, Depends(server_state)]
"""A route parameter of this type gets the server's state."""
