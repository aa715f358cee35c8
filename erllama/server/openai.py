"""The OpenAI dialect: chat completions, completions (JSON or SSE), embeddings and models, in OpenAI's envelope.

Wire types are pydantic models of this module; the runtime never sees them. A request is turned into a prompt with
the model's chat template and run through :meth:`erllama.runtime.Runtime.infer`; a client that disconnects
mid-stream cancels its request (the stream's consumer goes away, which cancels it).
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

from erllama.errors import ErllamaError, InvalidInputError, UnknownModelError, WorkerStoppedError
from erllama.runtime import Completion, Finished, Runtime, TextDelta
from erllama.server.state import ServerState

__all__ = ["router"]  # wire types and helpers stay inside the dialect

router = APIRouter()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
        return "".join(str(p) for p in parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int | None, Field(ge=0)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[int], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=0)] = None


def error_response(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """OpenAI's error envelope."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def map_error(exc: Exception) -> JSONResponse:
    """An exception of the one tree, as OpenAI reports it."""
    if isinstance(exc, UnknownModelError):
        return error_response(404, str(exc).strip("'\""), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, InvalidInputError):
        return error_response(400, str(exc), "invalid_request_error")
    if isinstance(exc, WorkerStoppedError):
        return error_response(503, str(exc), "server_error", code="model_unavailable")
    if isinstance(exc, ErllamaError):
        return error_response(500, str(exc), "server_error")
    raise exc


def _usage(c: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.stats.prompt_tokens,
        "completion_tokens": c.stats.generated_tokens,
        "total_tokens": c.stats.prompt_tokens + c.stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": c.stats.restored_tokens},
    }


def _finish_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.erllama
    return {"object": "list", "data": [_model_card(name, state) for name in state.model_names()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    if model_id not in state.model_names():
        return error_response(
            404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
        )
    return _model_card(model_id, state)


def _model_card(name: str, state: ServerState) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.started, "owned_by": "erllama"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    rt: Runtime = state.runtime
    try:
        model_id = state.resolve(body.model)
        messages = [(m.role, m.text()) for m in body.messages]
        # rendered on the model's worker between two ticks: wait for it off the event loop
        prompt = await asyncio.to_thread(rt.apply_chat_template, model_id, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        stream = rt.infer(
            model_id,
            prompt,
            max_tokens=max_tokens if max_tokens is not None else state.default_max_tokens,
            stop=body.stops(),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
    except ErllamaError as exc:
        return map_error(exc)
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _sse(stream, ident, created, body.model, usage), media_type="text/event-stream", headers=_NO_BUFFER
        )
    completion = await _finish(stream)
    if not isinstance(completion, Completion):
        return completion
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.reply},
                "logprobs": None,
                "finish_reason": _finish_reason(completion),
            }
        ],
        "usage": _usage(completion),
    }


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    try:
        model_id = state.resolve(body.model)
        stream = state.runtime.infer(
            model_id,
            body.prompt,
            max_tokens=body.max_tokens if body.max_tokens is not None else 16,
            stop=body.stops(),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
    except ErllamaError as exc:
        return map_error(exc)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]}

    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage

        async def sse() -> AsyncIterator[bytes]:
            async for event in stream:
                if isinstance(event, TextDelta) and event.text:
                    yield _data(chunk(event.text, None))
                elif isinstance(event, Finished):
                    yield _data(chunk("", _finish_reason(event.completion)))
                    if usage:
                        yield _data({**chunk("", None), "choices": [], "usage": _usage(event.completion)})
                elif not isinstance(event, TextDelta):
                    yield _data({"error": {"message": str(getattr(event, "error", "")), "type": "server_error"}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=_NO_BUFFER)
    completion = await _finish(stream)
    if not isinstance(completion, Completion):
        return completion
    return {**chunk(completion.reply, _finish_reason(completion)), "usage": _usage(completion)}


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
        model_id = state.resolve(body.model)
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


async def _finish(stream: Any) -> Completion | JSONResponse:
    """Read a stream to its end: the completion, or the error as OpenAI reports it."""
    try:
        async for event in stream:
            if isinstance(event, Finished):
                return event.completion
    except ErllamaError as exc:
        return map_error(exc)
    error = stream.error
    return map_error(error if isinstance(error, Exception) else RuntimeError(str(error)))


def _data(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


_NO_BUFFER = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _sse(stream: Any, ident: str, created: int, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        return {**body, "usage": None} if include_usage else body

    def delta(content: dict[str, Any], finish: str | None) -> bytes:
        return _data(chunk([{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]))

    yield delta({"role": "assistant", "content": ""}, None)
    async for event in stream:
        if isinstance(event, TextDelta) and event.text:
            yield delta({"content": event.text}, None)
        elif isinstance(event, Finished):
            yield delta({}, _finish_reason(event.completion))
            if include_usage:
                yield _data({**chunk([]), "usage": _usage(event.completion)})
        elif not isinstance(event, TextDelta):  # Failed: an error after the 200 went out
            yield _data({"error": {"message": str(getattr(event, "error", "")), "type": "server_error"}})
    yield b"data: [DONE]\n\n"
