"""What the dialects share about running a conversation: render it (off the event loop), start it under the
model's queue limits, and turn the runtime's stream into dialect-neutral events with tool-call text held back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from starlette.requests import Request

from erllama._native import SamplerConfig
from erllama._native.text import utf8
from erllama.chat import ChatResult, Message, PreparedChat, Tool, ToolChoice
from erllama.errors import ErllamaError, TokenIdError
from erllama.runtime import Completion, Failed, Finished, Stream, TextDelta, ThinkingDelta, TokenLogprob
from erllama.server.state import ServerState

__all__ = [
    "ChatRun",
    "End",
    "Error",
    "Params",
    "Text",
    "Thinking",
    "collect",
    "heartbeat",
    "start_chat",
    "start_text",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Params:
    """Generation parameters every dialect can express."""

    max_tokens: int
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
    """A started request: the model it runs on, the rendered chat (None for raw prompts), the runtime stream."""

    state: ServerState
    name: str
    model_id: str
    prepared: PreparedChat | None
    stream: Stream
    release: Callable[[], None]  # gives the queue slot back; called when the run ends

    async def events(self) -> AsyncIterator[Event]:
        """The run as neutral events; leaving early (a disconnected client) cancels the request."""
        filt = self.prepared.stream_filter() if self.prepared is not None else None
        ended = False
        pending: list[TokenLogprob] = []
        try:
            async for event in self.stream:
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
) -> ChatRun:
    """Resolve ``model`` (loading it if needed; ``keep_alive_s`` as in :meth:`ServerState.touch`), take a queue
    slot, render and start the conversation."""
    model_id = await state.ensure_loaded(model, keep_alive_s)
    release = await state.acquire(model_id)
    try:
        prepared = await asyncio.to_thread(
            state.chat.prepare,
            model_id,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            response_schema=response_schema,
        )
        stream = _infer(state, model_id, prepared.prompt, params, prepared.grammar)
    except BaseException:
        release()
        raise
    return ChatRun(state, model, model_id, prepared, stream, release)


async def start_text(
    state: ServerState,
    model: str,
    prompt: str | list[int],
    params: Params,
    *,
    response_schema: Mapping[str, Any] | bool | None = None,
    keep_alive_s: float | str | None = "default",
) -> ChatRun:
    """Like :func:`start_chat` for a raw prompt (no template)."""
    model_id = await state.ensure_loaded(model, keep_alive_s)
    release = await state.acquire(model_id)
    try:
        grammar = None
        if response_schema is not None:
            from erllama._native import json_schema_to_grammar

            grammar = await asyncio.to_thread(json_schema_to_grammar, response_schema)
        stream = _infer(state, model_id, prompt, params, grammar)
    except BaseException:
        release()
        raise
    return ChatRun(state, model, model_id, None, stream, release)


def _infer(state: ServerState, model_id: str, prompt: str | list[int], params: Params, grammar: str | None) -> Stream:
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
        stop=params.stop,
        sampling=sampling,
        thinking=params.thinking,
        logprobs=params.logprobs,
    )
