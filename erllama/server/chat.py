"""What the dialects share about running a conversation: render it (off the event loop), start it under the
model's queue limits, and turn the runtime's stream into dialect-neutral events with tool-call text held back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from starlette.requests import Request

from erllama.cache.report import CacheReport
from erllama.chat import ChatResult, Message, PreparedChat, Tool, ToolChoice
from erllama.chat.stable import stabilize
from erllama.errors import ErllamaError, TokenIdError
from erllama.runtime import (
    Completion,
    Failed,
    Finished,
    Started,
    Stream,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    TokenLogprob,
)
from erllama.sampling import SamplerConfig
from erllama.server.notes import current, note
from erllama.server.state import ServerState
from erllama.text import utf8

__all__ = [
    "ChatRun",
    "End",
    "Error",
    "Event",
    "Params",
    "Text",
    "Thinking",
    "collect",
    "heartbeat",
    "llama_timings",
    "start_chat",
    "start_chat_choices",
    "start_text",
]

log = logging.getLogger("erllama.server")


def llama_timings(c: Completion) -> dict[str, Any]:
    """llama-server's ``timings`` of a finished request (the prompt part counts the tokens computed, not restored)."""
    s = c.stats
    prompt_ms, predicted_ms = s.ttft_s * 1e3, s.generate_s * 1e3
    prompt_n = s.prompt_tokens - s.restored_tokens
    return {
        "cache_n": s.restored_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / s.ttft_s if s.ttft_s else 0.0,
        "predicted_n": s.generated_tokens,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / s.generated_tokens if s.generated_tokens else 0.0,
        "predicted_per_second": s.tokens_per_s,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class Params:
    """Generation parameters every dialect can express."""

    max_tokens: int | None  # None: what the context leaves after the prompt
    stop: Sequence[str] = ()
    sampling: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    thinking: bool = False
    logprobs: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Thinking:
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class End:
    completion: Completion
    result: ChatResult


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    error: BaseException


Event = Text | Thinking | End | Error


@dataclasses.dataclass(slots=True)
class ChatRun:
    """A started request: the model it runs on, the rendered chat (None for raw prompts), the runtime stream, and
    what the model said when it admitted the request (its prompt length, the cached part)."""

    state: ServerState
    name: str
    model_id: str
    prepared: PreparedChat | None
    stream: Stream
    release: Callable[[], None]  # gives the queue slot back; called when the run ends
    started: Started
    rest: AsyncIterator[StreamEvent]  # the stream's events after Started

    async def events(self) -> AsyncIterator[Event]:
        """The run as neutral events; leaving early (a disconnected client) cancels the request."""
        filt = self.prepared.stream_filter() if self.prepared is not None else None
        ended = False
        pending: list[TokenLogprob] = []
        try:
            async for event in self.rest:
                if isinstance(event, TextDelta):
                    pending.extend(event.logprobs)
                    out = filt.feed(event.text) if filt is not None else event.text
                    if out:
                        yield Text(out, tuple(pending))
                        pending.clear()
                elif isinstance(event, ThinkingDelta):
                    yield Thinking(event.text)
                elif isinstance(event, Finished):
                    c = event.completion
                    if filt is not None:
                        rest, result = filt.finish()
                        if rest:
                            yield Text(rest, tuple(pending))
                    else:
                        result = self._parse(c)
                    ended = True
                    self.state.metrics.record(self.name, c)
                    yield End(c, dataclasses.replace(result, thinking=c.thinking or None))
                elif isinstance(event, Failed):
                    ended = True
                    self.state.metrics.finished.labels(self.name, "error").inc()
                    yield Error(event.error)
        finally:
            if not ended:  # the client left: the request is cancelled (within one tick)
                self.state.metrics.finished.labels(self.name, "cancelled").inc()
            self.close()

    def close(self) -> None:
        """End the run (idempotent): cancel the request, give its queue slot back."""
        self.stream.cancel()
        self.release()

    def _parse(self, c: Completion) -> ChatResult:
        return self.prepared.parse(c.reply) if self.prepared is not None else ChatResult(content=c.reply)


async def heartbeat(events: AsyncIterator[Event], period_s: float) -> AsyncIterator[Event | None]:
    """``events``, with a None whenever ``period_s`` pass without one (a long prefill): the caller sends its
    keep-alive (Anthropic's ``ping``). The pending read is never cancelled, so the run is not disturbed."""
    it = aiter(events)
    pending: asyncio.Future[Event] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=period_s)
            if not done:
                yield None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None:
            pending.cancel()  # ends the run's generator (its cleanup cancels the request) ...
            await asyncio.wait({pending})  # ... and lets it finish before it is closed
        await it.aclose()  # type: ignore[attr-defined]


async def collect(run: ChatRun, request: Request | None = None) -> End:
    """Run to the end (non-streamed replies). Raises the request's error.

    With ``request``, a client that disconnects before the reply is ready cancels the run (the worker stops within
    one token or one prefill chunk after that).
    """
    watcher = asyncio.create_task(_watch(request, run)) if request is not None else None
    try:
        async for event in run.events():
            if isinstance(event, End):
                return event
            if isinstance(event, Error):
                raise event.error
    finally:
        if watcher is not None:
            watcher.cancel()
    raise ErllamaError("the request ended without a result")


async def _watch(request: Request, run: ChatRun) -> None:
    # The body has been read, so the next ASGI message is the disconnect. A blocking receive, not
    # ``is_disconnected()``: the latter's non-blocking poll never sees it through BaseHTTPMiddleware.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    run.stream.cancel()


async def start_chat(
    state: ServerState,
    model: str,
    messages: Sequence[Message],
    params: Params,
    *,
    tools: Sequence[Tool] = (),
    tool_choice: ToolChoice = "auto",
    response_schema: Mapping[str, Any] | bool | None = None,
    keep_alive_s: float | str | None = "default",
    continue_final: bool = False,
) -> ChatRun:
    """Resolve ``model`` (loading it if needed; ``keep_alive_s`` as in :meth:`ServerState.touch`), render the
    conversation (continuing a final assistant message with ``continue_final``), take a queue slot and start it.
    Returns once the model admitted it; raises its error (a prompt over the context, ...) otherwise."""
    (run,) = await start_chat_choices(
        state,
        model,
        messages,
        params,
        1,
        tools=tools,
        tool_choice=tool_choice,
        response_schema=response_schema,
        keep_alive_s=keep_alive_s,
        continue_final=continue_final,
    )
    return run


async def start_chat_choices(
    state: ServerState,
    model: str,
    messages: Sequence[Message],
    params: Params,
    n: int,
    *,
    tools: Sequence[Tool] = (),
    tool_choice: ToolChoice = "auto",
    response_schema: Mapping[str, Any] | bool | None = None,
    keep_alive_s: float | str | None = "default",
    continue_final: bool = False,
    grammar: str | None = None,
) -> list[ChatRun]:
    """:func:`start_chat` for ``n`` independent replies to one conversation (OpenAI's ``n``); ``grammar`` (GBNF,
    llama-server's extension) constrains the reply instead of a schema's."""
    model_id = await state.ensure_loaded(model, keep_alive_s)
    model = model or state.served_name(None)  # a request that named none is answered in the default's name
    messages, tools = stabilize(messages, tools, state.config.stable)
    prepared = await asyncio.to_thread(
        state.chat.prepare,
        model_id,
        messages,
        tools=tools,
        tool_choice=tool_choice,
        response_schema=response_schema,
        continue_final=continue_final,
    )
    runs = await _start_choices(
        state,
        name=model,
        model_id=model_id,
        prompt=prepared.prompt,
        params=params,
        n=n,
        grammar=grammar or prepared.grammar,
        prepared=prepared,
        save_at=prepared.save_at,
    )
    report = runs[0].started.cache
    notes = current()
    if (
        report is not None
        and report.diverged_at is not None
        and (log.isEnabledFor(logging.DEBUG) or (notes and notes.explain))
    ):
        try:
            report = await asyncio.to_thread(
                _explain, state, model_id, messages=messages, tools=tools, prepared=prepared, report=report
            )
        except Exception:  # a diagnostic never fails the request it describes (whose runs have started)
            log.warning("model %s: the cache report could not be explained", model_id, exc_info=True)
        else:
            runs[0].started = dataclasses.replace(runs[0].started, cache=report)
            if notes is not None and notes.reports:
                notes.reports[0] = report
    return runs


def _explain(
    state: ServerState,
    model_id: str,
    *,
    messages: Sequence[Message],
    tools: Sequence[Tool],
    prepared: PreparedChat,
    report: CacheReport,
) -> CacheReport:
    """``report`` with the index of the message its divergence falls in, logged at debug level: the most leading
    messages that, rendered alone (as the request was, without a generation prompt), still end before it. A binary
    search, so a few renders however long the conversation."""
    rt = state.runtime
    at = report.diverged_at
    assert at is not None
    full = rt.tokenize(model_id, prepared.prompt, add_special=True, parse_special=True)

    def before(i: int) -> bool:
        """Whether the first ``i`` messages, rendered alone, are a prefix of the prompt that ends at or before the
        divergence (a template that renders a message differently once it is not the last fails this too)."""
        text = state.chat.prepare(model_id, messages[:i], tools=tools, add_generation_prompt=False).prompt
        toks = rt.tokenize(model_id, text, add_special=True, parse_special=True)
        return len(toks) <= at and toks == full[: len(toks)]

    lo, hi = 0, len(messages)  # messages[:lo] end at or before the divergence
    try:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if before(mid):
                lo = mid
            else:
                hi = mid - 1
    except ErllamaError:  # a template that refuses a cut conversation: say what is known
        pass
    else:
        report = dataclasses.replace(report, message=lo)
    line = report.explain(lambda ids: rt.detokenize(model_id, ids))
    log.debug("model %s: %s", model_id, line)
    return dataclasses.replace(report, reason=line)


async def start_text(
    state: ServerState,
    model: str,
    prompt: str | list[int],
    params: Params,
    *,
    response_schema: Mapping[str, Any] | bool | None = None,
    keep_alive_s: float | str | None = "default",
    n: int = 1,
) -> list[ChatRun]:
    """Like :func:`start_chat_choices` for a raw prompt (no template)."""
    model_id = await state.ensure_loaded(model, keep_alive_s)
    model = model or state.served_name(None)
    grammar = None
    if response_schema is not None:
        from erllama._native import json_schema_to_grammar

        grammar = await asyncio.to_thread(json_schema_to_grammar, response_schema)
    return await _start_choices(
        state, name=model, model_id=model_id, prompt=prompt, params=params, n=n, grammar=grammar, prepared=None
    )


async def _start_choices(
    state: ServerState,
    *,
    name: str,
    model_id: str,
    prompt: str | list[int],
    params: Params,
    n: int,
    grammar: str | None,
    prepared: PreparedChat | None,
    save_at: Sequence[int] = (),
) -> list[ChatRun]:
    """Start ``n`` runs of one prompt, each in its own queue slot. With ``n > 1`` the prompt is prefilled once
    first and saved, so that every choice restores it from the cache instead of computing it again; a seeded
    request gives choice ``i`` the seed ``seed + i`` (else all would sample the same reply). A request without a
    seed gets the daemon's default seed when it has one (``--seed``)."""
    if params.sampling.seed is None and state.config.default_seed is not None:
        params = dataclasses.replace(
            params, sampling=dataclasses.replace(params.sampling, seed=state.config.default_seed)
        )
    if n > 1:
        state.check_choices(model_id, n)
        await _prefill(state, model_id, prompt)
    runs: list[ChatRun] = []
    try:
        async with state.fanout(model_id, n):
            for i in range(n):
                p = params
                if i and params.sampling.seed is not None:
                    p = dataclasses.replace(
                        params, sampling=dataclasses.replace(params.sampling, seed=params.sampling.seed + i)
                    )
                release = await state.acquire(model_id)
                try:
                    stream = _infer(state, model_id, prompt, p, grammar, save_at=save_at)
                except BaseException:
                    release()
                    raise
                runs.append(
                    await _admitted(
                        state, name=name, model_id=model_id, prepared=prepared, stream=stream, release=release
                    )
                )
    except BaseException:
        for run in runs:
            run.close()
        raise
    return runs


async def _prefill(state: ServerState, model_id: str, prompt: str | list[int]) -> None:
    """Prefill ``prompt`` into the cache (a prompt-only request, whose finish save is the whole prompt)."""
    release = await state.acquire(model_id)
    try:
        stream = state.runtime.infer(model_id, prompt, max_tokens=0)
        async for event in stream:
            if isinstance(event, Failed):
                raise event.error
    finally:
        release()


async def _admitted(
    state: ServerState,
    *,
    name: str,
    model_id: str,
    prepared: PreparedChat | None,
    stream: Stream,
    release: Callable[[], None],
) -> ChatRun:
    """Wait until the model admits the request (it passed every check: context room, token ids, its sampler) and
    return the run; raise the request's error otherwise. So a request refused by the model is refused before the
    first byte of a streamed reply goes out, with the status an unstreamed request gets."""
    rest = aiter(stream)
    try:
        first = await anext(rest)
    except BaseException:
        stream.cancel()
        release()
        raise
    if isinstance(first, Started):
        note(first.cache)
        return ChatRun(state, name, model_id, prepared, stream, release, first, rest)
    stream.cancel()
    release()
    if isinstance(first, Failed):
        raise first.error
    raise ErllamaError(f"the request began with {type(first).__name__}, not its admission")


def _infer(
    state: ServerState,
    model_id: str,
    prompt: str | list[int],
    params: Params,
    grammar: str | None,
    *,
    save_at: Sequence[int] = (),
) -> Stream:
    if isinstance(prompt, str):
        utf8(prompt, "the prompt")  # a lone surrogate is refused here, before a stream starts, not in the worker
    if params.sampling.logit_bias:
        n_vocab = int(state.runtime.model_info(model_id).get("n_vocab") or 0)
        for token in params.sampling.logit_bias:
            if not 0 <= token < n_vocab:
                raise TokenIdError(token, n_vocab)
    sampling = dataclasses.replace(params.sampling, grammar=grammar) if grammar else params.sampling
    return state.runtime.infer(
        model_id,
        prompt,
        max_tokens=params.max_tokens,
        fit_context=not state.config.strict_max_tokens,
        stop=params.stop,
        sampling=sampling,
        thinking=params.thinking,
        logprobs=params.logprobs,
        save_at=save_at,
    )
