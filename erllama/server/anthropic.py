"""The Anthropic dialect: ``POST /v1/messages`` (JSON or the named-event SSE sequence) and
``POST /v1/messages/count_tokens``, in Anthropic's error envelope; a busy model is HTTP 529 with ``retry-after``.

Content blocks map to :mod:`erllama.chat.types`: ``text``; ``tool_use`` (an assistant's call); ``tool_result`` (a
``tool`` turn answering a call); ``thinking`` (kept as the turn's thinking). Replies are split back into a
``thinking`` block (when ``thinking`` is enabled and the model emits ``<think>``), a ``text`` block and
``tool_use`` blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from erllama.chat import ChatResult, Message, Tool, ToolCall
from erllama.chat.stable import BILLING_HEADER, MARK, strip_billing_header
from erllama.errors import InvalidInputError, PromptTooLongError
from erllama.runtime import Completion
from erllama.sampling import SamplerConfig
from erllama.server.chat import ChatRun, End, Error, Params, Text, Thinking, collect, heartbeat, start_chat
from erllama.server.errors import failure
from erllama.server.state import StateDep

__all__ = ["router"]  # wire types and helpers stay inside the dialect

router = APIRouter()

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Anthropic's error envelope."""
    kind = _ERROR_TYPES.get(status, "api_error")
    return JSONResponse(
        {"type": "error", "error": {"type": kind, "message": message}}, status_code=status, headers=headers
    )


_STATUS = {"not_found": 404, "invalid": 400, "busy": 529, "stopped": 529, "internal": 500}


def map_error(exc: BaseException) -> JSONResponse:
    f = failure(exc)
    message = f.message
    if isinstance(f.exc, PromptTooLongError):
        # the words Anthropic's API uses: clients match "prompt is too long" to compact their context
        e = f.exc
        room = e.n_ctx - (e.max_tokens or 0) if e.max_tokens and e.prompt_tokens < e.n_ctx else e.n_ctx
        message = f"prompt is too long: {e.prompt_tokens} tokens > {room} maximum ({e})"
    return error_response(_STATUS[f.kind], message, headers=f.headers)


class Block(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    thinking: str | None = None


class MessageIn(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    cache_control: dict[str, Any] | None = None


def _breakpoint(block: Block) -> str:
    """:data:`MARK` after a block that carries ``cache_control`` (a save point there), else nothing."""
    return MARK if (block.model_extra or {}).get("cache_control") else ""


class ToolChoiceIn(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class ThinkingIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int | None, Field(ge=1)] = None


class CountRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    system: str | list[Block] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None

    def neutral(self, *, strip_billing: bool = False) -> list[Message]:
        """The conversation as neutral messages, a :data:`MARK` after each block with ``cache_control`` (and,
        for a cached tool list, before the first turn: the tools render before it). ``strip_billing``: drop
        Claude Code's volatile ``x-anthropic-billing-header`` line from the system blocks
        (:mod:`erllama.chat.stable`)."""
        out: list[Message] = []
        if self.system:
            if isinstance(self.system, str):
                text = self.system
            else:
                parts = []
                for b in self.system:
                    t = b.text or ""
                    if strip_billing and b.type == "text" and BILLING_HEADER.match(t):
                        t = strip_billing_header(t)
                        if not t.strip():
                            continue
                    parts.append(t + _breakpoint(b))
                text = "".join(parts)
            if text:
                out.append(Message(role="system", content=text))
        tools_cached = any(t.cache_control for t in self.tools or ())
        names: dict[str, str] = {}
        for m in self.messages:
            if isinstance(m.content, str):
                out.append(Message(role=m.role, content=m.content))
                continue
            texts, calls, thinking = [], [], None
            for b in m.content:
                if b.type == "text":
                    texts.append((b.text or "") + _breakpoint(b))
                elif b.type == "tool_use" and m.role == "assistant":
                    if not b.id or not b.name:
                        raise InvalidInputError("a tool_use block needs an id and a name")
                    names[b.id] = b.name
                    calls.append(ToolCall(b.id, b.name, json.dumps(b.input or {}, ensure_ascii=False)))
                elif b.type == "tool_result" and m.role == "user":
                    if not b.tool_use_id:
                        raise InvalidInputError("a tool_result block needs a tool_use_id")
                    body = b.content if isinstance(b.content, str) else _block_text(b.content or [])
                    body += _breakpoint(b)
                    out.append(
                        Message(role="tool", content=body, tool_call_id=b.tool_use_id, name=names.get(b.tool_use_id))
                    )
                elif b.type in ("thinking", "redacted_thinking"):
                    thinking = b.thinking
                else:
                    raise InvalidInputError(f"content blocks of type {b.type!r} are not supported in {m.role} turns")
            if texts or calls or not m.content:
                out.append(Message(role=m.role, content="".join(texts), tool_calls=tuple(calls), thinking=thinking))
        if tools_cached:
            first = next((i for i, m in enumerate(out) if m.role != "system"), None)
            if first is not None:
                out[first] = dataclasses.replace(out[first], content=MARK + out[first].content)
        return out

    def tool_list(self) -> list[Tool]:
        return [Tool(t.name, t.description, t.input_schema) for t in self.tools or ()]

    def choice(self) -> str:
        tc = self.tool_choice
        if tc is None or tc.type == "auto":
            return "auto"
        if tc.type == "any":
            return "required"
        if tc.type == "none":
            return "none"
        if not tc.name:
            raise InvalidInputError("tool_choice of type 'tool' needs a name")
        return tc.name


def _block_text(blocks: list[dict[str, Any]]) -> str:
    """The text of a tool_result's blocks; any other block (an image, a document) is refused, not dropped."""
    for b in blocks:
        if b.get("type") != "text":
            raise InvalidInputError(
                f"tool_result content blocks of type {b.get('type')!r} are not supported: the model reads text only"
            )
    return "".join(str(b.get("text", "")) for b in blocks)


class OutputFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: OutputFormat | None = None


class MessagesRequest(CountRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: Annotated[list[str], Field(max_length=16)] | None = None
    temperature: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    top_k: Annotated[int | None, Field(ge=0, lt=2**31)] = None
    stream: bool = False
    thinking: ThinkingIn | None = None
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's name for output_config.format

    def response_schema(self) -> dict[str, Any] | None:
        """The JSON schema the reply must satisfy (structured outputs), enforced by a grammar; None: free text."""
        fmt = self.output_format or (self.output_config.format if self.output_config is not None else None)
        if fmt is None:
            return None
        return fmt.schema_ or {"type": "object"}

    def params(self) -> Params:
        sampling = SamplerConfig(
            temperature=0.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
        )
        thinking = self.thinking is not None and self.thinking.type != "disabled"
        return Params(self.max_tokens, list(self.stop_sequences or ()), sampling, thinking)


def _stop_reason(c: Completion, result: ChatResult) -> str:
    if result.tool_calls:
        return "tool_use"
    if c.stop_sequence is not None:
        return "stop_sequence"
    if c.finish_reason == "length":
        return "max_tokens"
    return "end_turn"


def _usage(c: Completion) -> dict[str, Any]:
    s = c.stats
    return {
        "input_tokens": s.prompt_tokens - s.restored_tokens,
        "output_tokens": s.generated_tokens,
        "cache_read_input_tokens": s.restored_tokens,
        "cache_creation_input_tokens": 0,
    }


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountRequest, state: StateDep) -> Any:
    model_id = await state.ensure_loaded(body.model)
    prepared = await asyncio.to_thread(
        state.chat.prepare,
        model_id,
        body.neutral(strip_billing=state.config.stable.strip_billing_header),
        tools=body.tool_list(),
        tool_choice=body.choice(),
        continue_final=True,
    )
    tokens = await asyncio.to_thread(state.runtime.tokenize, model_id, prepared.prompt, parse_special=True)
    return {"input_tokens": len(tokens)}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request, state: StateDep) -> Any:
    if len(body.messages) > state.config.max_messages:
        return error_response(400, f"more than {state.config.max_messages} messages")
    run = await start_chat(
        state,
        body.model,
        body.neutral(strip_billing=state.config.stable.strip_billing_header),
        body.params(),
        tools=body.tool_list(),
        tool_choice=body.choice(),
        response_schema=body.response_schema(),
        continue_final=True,  # a final assistant turn is a prefill: the reply continues it
    )
    ident = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(
            _sse(run, ident, body.model), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    end = await collect(run, request)
    content: list[dict[str, Any]] = []
    if end.result.thinking and body.params().thinking:
        content.append({"type": "thinking", "thinking": end.result.thinking, "signature": _SIGNATURE})
    if end.result.content or not end.result.tool_calls:
        content.append({"type": "text", "text": end.result.content})
    content.extend(_tool_use(c) for c in end.result.tool_calls)
    return {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": body.model,
        "content": content,
        "stop_reason": _stop_reason(end.completion, end.result),
        "stop_sequence": end.completion.stop_sequence,
        "usage": _usage(end.completion),
    }


_SIGNATURE = "erllama-local"  # thinking blocks are not signed by a local model; clients only need the field


def _tool_use(call: ToolCall) -> dict[str, Any]:
    try:
        args = json.loads(call.arguments)
    except ValueError:
        args = {}
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": args if isinstance(args, dict) else {}}


def _event(kind: str, body: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **body}, ensure_ascii=False)}\n\n".encode()


async def _sse(run: ChatRun, ident: str, model: str) -> AsyncIterator[bytes]:
    start: dict[str, Any] = {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": run.started.prompt_tokens - run.started.restored_tokens,
            "output_tokens": 0,
            "cache_read_input_tokens": run.started.restored_tokens,
            "cache_creation_input_tokens": 0,
        },
    }
    yield _event("message_start", {"message": start})
    yield _event("ping", {})
    index = -1
    open_kind: str | None = None

    def close() -> bytes:
        nonlocal open_kind
        out = b""
        if open_kind == "thinking":
            out += _event(
                "content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": _SIGNATURE}}
            )
        out += _event("content_block_stop", {"index": index})
        open_kind = None
        return out

    def begin(kind: str, block: dict[str, Any]) -> bytes:
        nonlocal index, open_kind
        out = close() if open_kind is not None else b""
        index += 1
        open_kind = kind
        return out + _event("content_block_start", {"index": index, "content_block": block})

    async for event in heartbeat(run.events(), run.state.config.ping_period_s):
        if event is None:
            yield _event("ping", {})
        elif isinstance(event, Thinking):
            if open_kind != "thinking":
                yield begin("thinking", {"type": "thinking", "thinking": ""})
            yield _event(
                "content_block_delta", {"index": index, "delta": {"type": "thinking_delta", "thinking": event.text}}
            )
        elif isinstance(event, Text):
            if open_kind != "text":
                yield begin("text", {"type": "text", "text": ""})
            yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": event.text}})
        elif isinstance(event, End):
            if index < 0 and not event.result.tool_calls:
                yield begin("text", {"type": "text", "text": ""})
            for call in event.result.tool_calls:
                block = _tool_use(call)
                yield begin("tool_use", {**block, "input": {}})
                partial = json.dumps(block["input"], ensure_ascii=False)
                yield _event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "input_json_delta", "partial_json": partial}},
                )
            if open_kind is not None:
                yield close()
            c = event.completion
            delta = {"stop_reason": _stop_reason(c, event.result), "stop_sequence": c.stop_sequence}
            yield _event("message_delta", {"delta": delta, "usage": _usage(c)})
            yield _event("message_stop", {})
        elif isinstance(event, Error):
            yield _event("error", {"error": {"type": "api_error", "message": str(event.error)}})
