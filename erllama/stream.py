"""What a request gives back: :class:`Stream` (its events, for ``for`` and ``async for``) and the values in it
(:class:`Started`, :class:`TextDelta`, :class:`ThinkingDelta`, :class:`Finished` with its :class:`Completion`,
:class:`Failed`). The runtime (:mod:`erllama.runtime`) starts requests; this module turns a worker's events into
these."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator

from erllama.cache.key import CacheKey
from erllama.cache.report import CacheReport
from erllama.model.backend import TokenLogprob
from erllama.model.delivery import RequestHandle
from erllama.model.events import AdmittedEvent, DoneEvent, ErrorEvent, Event, TokenEvent
from erllama.model.think import ThinkSplitter

__all__ = [
    "Completion",
    "Failed",
    "Finished",
    "Started",
    "Stats",
    "Stream",
    "StreamEvent",
    "TextDelta",
    "ThinkingDelta",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """Timings and token counts of one request. ``ttft_s`` runs from admission to the first sampled token."""

    prompt_tokens: int
    restored_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    ttft_s: float
    generate_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token."""
        return (self.generated_tokens - 1) / self.generate_s if self.generated_tokens > 1 and self.generate_s else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """The result of :meth:`Runtime.complete` (and the final event of a stream)."""

    reply: str
    generated: tuple[int, ...]
    context_tokens: tuple[int, ...]
    committed_tokens: int
    finish_key: CacheKey | None
    cache_hit_kind: str  # exact | partial | cold
    finish_reason: str  # stop | length | cancelled
    stop_sequence: str | None
    thinking: str
    stats: Stats
    logprobs: tuple[TokenLogprob, ...] = ()
    """Per reply token, when requested (``infer(..., logprobs=n)``)."""
    cache: CacheReport | None = None
    """How the prompt met the cache (None: a model without one, or a request that skipped it)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Started:
    """The request passed the model's checks and runs (the first event; a request refused gets Failed instead):
    its context length, what the cache restored of it, and the reply length it may reach."""

    prompt_tokens: int
    restored_tokens: int
    max_tokens: int
    cache_hit_kind: str
    cache: CacheReport | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TextDelta:
    """Reply text. With ``logprobs`` requested, ``logprobs`` covers the tokens this text completes (a token whose
    text was held back, e.g. half of a multi-byte character, is reported with the next delta)."""

    text: str
    token: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ThinkingDelta:
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Finished:
    completion: Completion


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    error: BaseException


StreamEvent = Started | TextDelta | ThinkingDelta | Finished | Failed


class Stream:
    """A streaming request: iterate it (``for`` or ``async for``) for events; :meth:`cancel` from anywhere.

    Events: :class:`Started` once the request passed its checks (or :class:`Failed` at once), :class:`TextDelta` per
    reply token (text is UTF-8-safe and has stop sequences trimmed), :class:`ThinkingDelta` for text inside
    ``<think>`` ... ``</think>`` when thinking is split out, then exactly one :class:`Finished` or :class:`Failed`.
    """

    def __init__(self, handle: RequestHandle, thinking: bool) -> None:
        self._handle = handle
        self._split = ThinkSplitter() if thinking else None
        self._thinking: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._pending: list[TokenLogprob] = []
        self.completion: Completion | None = None
        self.error: BaseException | None = None

    @property
    def id(self) -> int:
        return self._handle.id

    def cancel(self) -> None:
        """Stop the request (idempotent); the final event is Finished with finish_reason ``cancelled``."""
        self._handle.cancel()

    def _convert(self, event: Event) -> list[StreamEvent]:
        if isinstance(event, AdmittedEvent):
            return [Started(event.prompt_tokens, event.restored_tokens, event.max_tokens, event.cache_hit, event.cache)]
        if isinstance(event, TokenEvent):
            if event.logprob is not None:
                self._logprobs.append(event.logprob)
                self._pending.append(event.logprob)
            if self._split is None:
                return [self._delta(event.text, event.token)] if event.text else []
            return self._parts(self._split.feed(event.text), event.token)
        if isinstance(event, ErrorEvent):
            self.error = event.error
            return [Failed(event.error)]
        out = self._parts(self._split.flush(), -1) if self._split is not None else []
        self.completion = _completion(event, "".join(self._thinking), self._split, tuple(self._logprobs))
        return [*out, Finished(self.completion)]

    def _delta(self, text: str, token: int) -> TextDelta:
        pending, self._pending = tuple(self._pending), []
        return TextDelta(text, token, pending)

    def _parts(self, parts: list[tuple[bool, str]], token: int) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for thinking, text in parts:
            if thinking:
                self._thinking.append(text)
                out.append(ThinkingDelta(text))
            else:
                out.append(self._delta(text, token))
        return out

    def __iter__(self) -> Iterator[StreamEvent]:
        for event in self._handle.events():
            yield from self._convert(event)

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        queue = self._handle.async_queue(asyncio.get_running_loop())
        try:
            while True:
                event = await queue.get()
                for out in self._convert(event):
                    yield out
                if isinstance(event, DoneEvent | ErrorEvent):
                    return
        finally:
            if self.completion is None:
                self._handle.cancel()  # the consumer went away (e.g. a client disconnected)

    def result(self, timeout_s: float | None = None) -> Completion:
        """Wait for the end (or return it, when the stream was already read); raises the request's error."""
        if self.error is not None:
            raise self.error
        if self.completion is not None:
            return self.completion
        for event in self._handle.events(timeout_s):
            for out in self._convert(event):
                if isinstance(out, Failed):
                    raise out.error
        assert self.completion is not None
        return self.completion


def _completion(
    done: DoneEvent, thinking: str, split: ThinkSplitter | None, logprobs: tuple[TokenLogprob, ...] = ()
) -> Completion:
    reply = done.text
    if split is not None:
        reply = "".join(text for inside, text in ThinkSplitter().feed_all(done.text) if not inside)
    return Completion(
        reply=reply,
        generated=done.tokens,
        context_tokens=done.context_tokens,
        committed_tokens=done.committed_tokens,
        finish_key=done.finish_key,
        cache_hit_kind=done.cache_hit,
        finish_reason=done.finish_reason.value,
        stop_sequence=done.stop_sequence,
        thinking=thinking,
        stats=Stats(
            prompt_tokens=done.prompt_tokens,
            restored_tokens=done.restored_tokens,
            prefilled_tokens=done.prefilled_tokens,
            generated_tokens=len(done.tokens),
            ttft_s=done.prefill_s,
            generate_s=done.generate_s,
        ),
        logprobs=logprobs,
        cache=done.cache,
    )
