"""The OpenAI dialect: chat completions, completions (JSON or SSE), embeddings and models, in OpenAI's envelope.

Wire types are pydantic models of this module; they are turned into :mod:`erllama.chat.types` before anything
else sees them. A client that disconnects mid-stream cancels its request (the stream's consumer goes away).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from erllama._native import JSON_OBJECT_SCHEMA, SamplerConfig
from erllama.chat import ChatResult, Message, Tool, ToolCall
from erllama.errors import ErllamaError, InvalidInputError
from erllama.runtime import Completion, TokenLogprob
from erllama.server.chat import ChatRun, End, Error, Params, Text, collect, start_chat, start_text
from erllama.server.errors import failure
from erllama.server.state import ServerState

__all__ = ["router"]  # wire types and helpers stay inside the dialect

router = APIRouter()


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")

    def neutral(self) -> Message:
        calls = tuple(
            ToolCall(
                c.id,
                c.function.name,
                c.function.arguments
                if isinstance(c.function.arguments, str)
                else json.dumps(c.function.arguments, ensure_ascii=False),
            )
            for c in self.tool_calls or ()
        )
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=self.text(), tool_calls=calls, tool_call_id=self.tool_call_id, name=self.name)


class FunctionDef(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int | None, Field(ge=0)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    logit_bias: (
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None
    ) = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def n_logprobs(self) -> int | None:
        return None

    def params(self, max_tokens: int) -> Params:
        sampling = SamplerConfig(
            temperature=0.0 if self.temperature is None else self.temperature,  # greedy unless asked
            top_p=1.0 if self.top_p is None else self.top_p,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            penalty_last_n=-1 if self.frequency_penalty or self.presence_penalty else 64,
            seed=self.seed,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
        )
        return Params(max_tokens=max_tokens, stop=self.stops(), sampling=sampling, logprobs=self.n_logprobs())


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    logprobs: Annotated[int | None, Field(ge=0, le=20)] = None

    def n_logprobs(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    input: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=0)] = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None

    def n_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInputError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def choice(self) -> str:
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.get("name", "")
        return self.tool_choice or "auto"

    def response_schema(self) -> dict[str, Any] | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return dict(JSON_OBJECT_SCHEMA)
        if rf.json_schema is None:
            raise InvalidInputError("response_format json_schema needs a json_schema object")
        return rf.json_schema.schema_ or dict(JSON_OBJECT_SCHEMA)


def error_response(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error envelope."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# failure kind -> (status, type, param, code)
_FAILURES: dict[str, tuple[int, str, str | None, str | None]] = {
    "not_found": (404, "invalid_request_error", "model", "model_not_found"),
    "invalid": (400, "invalid_request_error", None, None),
    "busy": (429, "rate_limit_exceeded", None, "model_busy"),
    "stopped": (503, "server_error", None, "model_unavailable"),
    "internal": (500, "server_error", None, None),
}


def map_error(exc: BaseException) -> JSONResponse:
    """An exception of the one tree, as OpenAI reports it."""
    f = failure(exc)
    status, kind, param, code = _FAILURES[f.kind]
    return error_response(status, f.message, kind, param, code, headers=f.headers)


def _usage(c: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.stats.prompt_tokens,
        "completion_tokens": c.stats.generated_tokens,
        "total_tokens": c.stats.prompt_tokens + c.stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": c.stats.restored_tokens},
    }


def _finish_reason(c: Completion, result: ChatResult | None = None) -> str:
    if result is not None and result.tool_calls:
        return "tool_calls"
    return "length" if c.finish_reason == "length" else "stop"


def _piece(piece: bytes) -> dict[str, Any]:
    return {"token": piece.decode("utf-8", "replace"), "bytes": list(piece)}


def _chat_logprobs(lps: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one chunk)."""
    return {
        "content": [
            {
                **_piece(lp.piece),
                "logprob": lp.logprob,
                "top_logprobs": [{**_piece(p), "logprob": v} for _, p, v in lp.top],
            }
            for lp in lps
        ],
        "refusal": None,
    }


def _legacy_logprobs(lps: tuple[TokenLogprob, ...], offset: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion (the legacy shape)."""
    tokens = [lp.piece.decode("utf-8", "replace") for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{p.decode("utf-8", "replace"): v for _, p, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _tool_calls(result: ChatResult) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in result.tool_calls
    ]


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.erllama
    return {"object": "list", "data": [_model_card(name, state) for name in sorted(state.available())]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    if model_id not in state.available():
        return error_response(
            404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
        )
    return _model_card(model_id, state)


def _model_card(name: str, state: ServerState) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.started, "owned_by": "erllama"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    if len(body.messages) > state.config.max_messages:
        return error_response(400, f"more than {state.config.max_messages} messages", "invalid_request_error")
    try:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or ()]
        run = await start_chat(
            state,
            body.model,
            [m.neutral() for m in body.messages],
            body.params(max_tokens if max_tokens is not None else state.default_max_tokens),
            tools=tools,
            tool_choice=body.choice(),
            response_schema=body.response_schema(),
        )
    except ErllamaError as exc:
        return map_error(exc)
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _chat_sse(run, ident, created, body.model, include_usage=usage, logprobs=body.logprobs),
            media_type="text/event-stream",
            headers=_NO_BUFFER,
        )
    try:
        end = await collect(run, request)
    except ErllamaError as exc:
        return map_error(exc)
    message: dict[str, Any] = {"role": "assistant", "content": end.result.content or None}
    if end.result.tool_calls:
        message["tool_calls"] = _tool_calls(end.result)
    elif message["content"] is None:
        message["content"] = ""
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": _chat_logprobs(end.completion.logprobs) if body.logprobs else None,
                "finish_reason": _finish_reason(end.completion, end.result),
            }
        ],
        "usage": _usage(end.completion),
    }


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    try:
        run = await start_text(
            state, body.model, body.prompt, body.params(body.max_tokens if body.max_tokens is not None else 16)
        )
    except ErllamaError as exc:
        return map_error(exc)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None, lps: tuple[TokenLogprob, ...] | None = None) -> dict[str, Any]:
        logprobs = _legacy_logprobs(lps) if lps is not None and body.logprobs is not None else None
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]}

    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage

        async def sse() -> AsyncIterator[bytes]:
            async for event in run.events():
                if isinstance(event, Text):
                    yield _data(chunk(event.text, None, event.logprobs))
                elif isinstance(event, End):
                    yield _data(chunk("", _finish_reason(event.completion)))
                    if usage:
                        yield _data({**chunk("", None), "choices": [], "usage": _usage(event.completion)})
                elif isinstance(event, Error):
                    yield _data({"error": {"message": str(event.error), "type": "server_error"}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=_NO_BUFFER)
    try:
        end = await collect(run, request)
    except ErllamaError as exc:
        return map_error(exc)
    c = end.completion
    return {**chunk(c.reply, _finish_reason(c), c.logprobs), "usage": _usage(c)}


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    rt = state.runtime
    inputs: list[str | list[int]]
    if isinstance(body.input, str):
        inputs = [body.input]
    elif all(isinstance(x, int) for x in body.input):
        inputs = [[int(x) for x in body.input]]
    else:
        inputs = [str(x) for x in body.input]
    try:
        model_id = await state.ensure_loaded(body.model)
        data, n_tokens = [], 0
        for i, item in enumerate(inputs):
            vector = await asyncio.to_thread(rt.embed, model_id, item)
            if isinstance(item, str):
                n_tokens += len(await asyncio.to_thread(rt.tokenize, model_id, item, parse_special=True))
            else:
                n_tokens += len(item)
            encoded: Any = vector
            if body.encoding_format == "base64":
                encoded = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
    except ErllamaError as exc:
        return map_error(exc)
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


def _data(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


_NO_BUFFER = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _chat_sse(
    run: ChatRun, ident: str, created: int, model: str, *, include_usage: bool, logprobs: bool
) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        return {**body, "usage": None} if include_usage else body

    def delta(content: dict[str, Any], finish: str | None, lps: tuple[TokenLogprob, ...] | None = None) -> bytes:
        choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        if lps is not None:
            choice["logprobs"] = _chat_logprobs(lps)
        return _data(chunk([choice]))

    yield delta({"role": "assistant", "content": ""}, None)
    async for event in run.events():
        if isinstance(event, Text):
            yield delta({"content": event.text}, None, event.logprobs if logprobs else None)
        elif isinstance(event, End):
            for i, call in enumerate(_tool_calls(event.result)):
                yield delta({"tool_calls": [{"index": i, **call}]}, None)
            yield delta({}, _finish_reason(event.completion, event.result))
            if include_usage:
                yield _data({**chunk([]), "usage": _usage(event.completion)})
        elif isinstance(event, Error):  # an error after the 200 went out
            yield _data({"error": {"message": str(event.error), "type": "server_error"}})
    yield b"data: [DONE]\n\n"
