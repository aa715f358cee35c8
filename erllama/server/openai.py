"""The OpenAI dialect: ``/v1/chat/completions`` (JSON or SSE) and ``/v1/models``, with OpenAI's error envelope.

Wire types are pydantic models of this module; the runtime never sees them. A request is turned into a prompt with
the model's chat template and run through :meth:`erllama.runtime.Runtime.infer`; a client that disconnects
mid-stream cancels its request (the stream's consumer goes away, which cancels it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

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


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int | None, Field(ge=0)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=0)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1


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
        prompt = rt.apply_chat_template(model_id, [(m.role, m.text()) for m in body.messages])
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        stream = rt.infer(
            model_id,
            prompt,
            max_tokens=max_tokens if max_tokens is not None else state.default_max_tokens,
            stop=stops,
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
    try:
        completion = None
        async for event in stream:
            if isinstance(event, Finished):
                completion = event.completion
    except ErllamaError as exc:
        return map_error(exc)
    if completion is None:
        assert stream.error is not None
        return map_error(stream.error if isinstance(stream.error, Exception) else RuntimeError(stream.error))
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


_NO_BUFFER = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _sse(stream: Any, ident: str, created: int, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None, usage: bool = False) -> bytes:
        body: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    async for event in stream:
        if isinstance(event, TextDelta) and event.text:
            yield chunk({"content": event.text}, None)
        elif isinstance(event, Finished):
            yield chunk({}, _finish_reason(event.completion))
            if include_usage:
                final = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(event.completion),
                }
                yield b"data: " + json.dumps(final).encode() + b"\n\n"
        elif not isinstance(event, TextDelta):  # Failed: an error after the 200 went out
            error = {"error": {"message": str(getattr(event, "error", "")), "type": "server_error"}}
            yield b"data: " + json.dumps(error).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
