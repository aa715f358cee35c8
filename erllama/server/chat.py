"""What the dialects share about running a conversation: render it (off the event loop), start it under the
model's queue limits, and turn the runtime's stream into dialect-neutral events with tool-call text held back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from erllama._native import SamplerConfig
from erllama.chat import ChatResult, Message, PreparedChat, Tool, ToolChoice
from erllama.errors import ErllamaError
from erllama.runtime import Completion, Failed, Finished, Stream, TextDelta, ThinkingDelta
from erllama.server.state import ServerState

__all__ = ["ChatRun", "End", "Error", "Params", "Text", "Thinking", "collect", "start_chat", "start_text"]


@dataclasses.dataclass(frozen=True, slots=True)
class Params:
    """Generation parameters every dialect can express."""

    max_tokens: int
    stop: Sequence[str] = ()
    sampling: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    thinking: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    text: str


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
    release: Any  # the queue slot; released when the run ends

    async def events(self) -> AsyncIterator[Event]:
        """The run as neutral events; leaving early (a disconnected client) cancels the request."""
        filt = self.prepared.stream_filter() if self.prepared is not None else None
        ended = False
        try:
            async for event in self.stream:
                if isinstance(event, TextDelta):
                    out = filt.feed(event.text) if filt is not None else event.text
                    if out:
                        yield Text(out)
                elif isinstance(event, ThinkingDelta):
                    yield Thinking(event.text)
                elif isinstance(event, Finished):
                    c = event.completion
                    if filt is not None:
                        rest, result = filt.finish()
                        if rest:
                            yield Text(rest)
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


async def collect(run: ChatRun) -> End:
    """Run to the end (non-streamed replies). Raises the request's error."""
    async for event in run.events():
        if isinstance(event, End):
            return event
        if isinstance(event, Error):
            raise event.error
    raise ErllamaError("the request ended without a result")


async def start_chat(
    state: ServerState,
    model: str,
    messages: Sequence[Message],
    params: Params,
    *,
    tools: Sequence[Tool] = (),
    tool_choice: ToolChoice = "auto",
    response_schema: Mapping[str, Any] | bool | None = None,
) -> ChatRun:
    """Resolve ``model`` (loading it if needed), take a queue slot, render and start the conversation."""
    model_id = await state.ensure_loaded(model)
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
) -> ChatRun:
    """Like :func:`start_chat` for a raw prompt (no template)."""
    model_id = await state.ensure_loaded(model)
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
    sampling = dataclasses.replace(params.sampling, grammar=grammar) if grammar else params.sampling
    return state.runtime.infer(
        model_id, prompt, max_tokens=params.max_tokens, stop=params.stop, sampling=sampling, thinking=params.thinking
    )
