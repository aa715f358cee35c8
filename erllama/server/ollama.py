"""The Ollama dialect: ``/api/generate``, ``/api/chat`` (NDJSON streaming by default), ``/api/embed``,
``/api/embeddings``, ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/pull``, ``/api/delete``, ``/api/copy``,
``/api/version``; errors as ``{"error": "..."}``; a busy model is HTTP 503.

Durations are nanoseconds. An empty prompt (or message list) loads the model; with ``keep_alive: 0`` it unloads it.
``format`` is ``"json"`` or a JSON schema, enforced by a grammar; ``think`` splits ``<think>`` text into
``thinking``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

import erllama
from erllama._native import JSON_OBJECT_SCHEMA, SamplerConfig
from erllama.chat import ChatResult, Message, Tool, ToolCall
from erllama.chat.tools import new_call_id
from erllama.errors import ErllamaError, InvalidInputError
from erllama.runtime import Completion
from erllama.server.chat import ChatRun, End, Error, Params, Text, Thinking, collect, start_chat, start_text
from erllama.server.errors import failure
from erllama.server.models import file_digest
from erllama.server.state import ManagedSource, ServerState

__all__ = ["router"]  # wire types and helpers stay inside the dialect

router = APIRouter()

_NDJSON = "application/x-ndjson"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_STATUS = {"not_found": 404, "invalid": 400, "busy": 503, "stopped": 503, "internal": 500}


def map_error(exc: BaseException) -> JSONResponse:
    f = failure(exc)
    return error_response(_STATUS[f.kind], f.message, headers=f.headers)


_PIECE = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?")  # Go-style durations: "5m", "1h30m", "250ms"
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def keep_alive_s(value: str | float | None) -> float | str | None:
    """Seconds from Ollama's keep_alive (``"5m"``, ``300``, ``-1``); None keeps forever, "default" when absent."""
    if value is None:
        return "default"
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        if not text or _PIECE.sub("", text):
            raise InvalidInputError(f"invalid keep_alive duration {value!r}")
        seconds = sum(float(amount) * _UNITS[unit or None] for amount, unit in _PIECE.findall(text))
    return None if seconds < 0 else seconds


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore")

    num_predict: int | None = None
    temperature: Annotated[float | None, Field(ge=0.0)] = None
    top_k: Annotated[int | None, Field(ge=0, lt=2**31)] = None
    top_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    typical_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    repeat_penalty: Annotated[float | None, Field(gt=0.0)] = None
    repeat_last_n: Annotated[int | None, Field(ge=-1, lt=2**31)] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    options: Options | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    format: Literal["json", ""] | dict[str, Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None

    def params(self, default_max: int) -> Params:
        o = self.options or Options()
        sampling = SamplerConfig(
            temperature=0.8 if o.temperature is None else o.temperature,
            top_k=40 if o.top_k is None else o.top_k,
            top_p=0.9 if o.top_p is None else o.top_p,
            min_p=0.0 if o.min_p is None else o.min_p,
            typical_p=1.0 if o.typical_p is None else o.typical_p,
            repeat_penalty=1.1 if o.repeat_penalty is None else o.repeat_penalty,
            penalty_last_n=64 if o.repeat_last_n is None else o.repeat_last_n,
            presence_penalty=o.presence_penalty or 0.0,
            frequency_penalty=o.frequency_penalty or 0.0,
            seed=o.seed,
        )
        n = o.num_predict if o.num_predict is not None and o.num_predict >= 0 else default_max
        return Params(n, list(o.stop or ()), sampling, bool(self.think))

    def response_schema(self) -> dict[str, Any] | None:
        if self.format == "json":
            return dict(JSON_OBJECT_SCHEMA)
        return self.format or None


class GenerateRequest(_Base):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None
    images: list[str] | None = None


class FunctionCallIn(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallIn(BaseModel):
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None

    def neutral(self) -> Message:
        if self.images:
            raise InvalidInputError("images are not supported by this model")
        calls = tuple(
            ToolCall(new_call_id(), c.function.name, json.dumps(c.function.arguments, ensure_ascii=False))
            for c in self.tool_calls or ()
        )
        return Message(self.role, self.content, calls, name=self.tool_name, thinking=self.thinking)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatRequest(_Base):
    messages: list[ChatMessageIn] = Field(default_factory=list)
    tools: list[ToolDef] | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    input: str | list[str] = ""
    truncate: bool = True
    keep_alive: str | float | None = None


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    prompt: str = ""
    keep_alive: str | float | None = None


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, validation_alias=AliasChoices("model", "name"))]
    stream: bool = True


class CopyRequest(BaseModel):
    source: Annotated[str, Field(min_length=1)]
    destination: Annotated[str, Field(min_length=1)]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _final(c: Completion, started: float) -> dict[str, Any]:
    s = c.stats
    return {
        "done": True,
        "done_reason": "length" if c.finish_reason == "length" else "stop",
        "total_duration": _ns(time.perf_counter() - started),
        "load_duration": 0,
        # like Ollama, only the prompt tokens evaluated now: a cached prefix is not counted
        "prompt_eval_count": s.prompt_tokens - s.restored_tokens,
        "prompt_eval_duration": _ns(s.ttft_s),
        "eval_count": s.generated_tokens,
        "eval_duration": _ns(s.generate_s),
    }


def _calls(result: ChatResult) -> list[dict[str, Any]]:
    out = []
    for c in result.tool_calls:
        try:
            args = json.loads(c.arguments)
        except ValueError:
            args = {}
        out.append({"function": {"name": c.name, "arguments": args if isinstance(args, dict) else {}}})
    return out


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode() + b"\n"


Chunk = Callable[[str], dict[str, Any]]


def _ndjson(run: ChatRun, text: Chunk, thinking: Chunk, end: Callable[[End], dict[str, Any]]) -> StreamingResponse:
    """A run streamed as NDJSON: one line per text / thinking piece, the final line, or an error line."""

    async def lines() -> AsyncIterator[bytes]:
        async for event in run.events():
            if isinstance(event, Text):
                yield _line(text(event.text))
            elif isinstance(event, Thinking):
                yield _line(thinking(event.text))
            elif isinstance(event, End):
                yield _line(end(event))
            elif isinstance(event, Error):
                yield _line({"error": str(event.error)})

    return StreamingResponse(lines(), media_type=_NDJSON)


async def _load_or_unload(state: ServerState, model: str, keep_alive: Any) -> dict[str, Any]:
    ka = keep_alive_s(keep_alive)
    if ka == 0:
        await state.unload(model)
        return {"done_reason": "unload"}
    await state.ensure_loaded(model, ka)
    return {"done_reason": "load"}


@router.get("/", include_in_schema=False)
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": erllama.__version__}


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    started = time.perf_counter()
    try:
        if not body.prompt and not body.system:
            done = await _load_or_unload(state, body.model, body.keep_alive)
            return {"model": body.model, "created_at": _now(), "response": "", "done": True, **done}
        if body.images:
            raise InvalidInputError("images are not supported by this model")
        params = body.params(state.default_max_tokens)
        ka = keep_alive_s(body.keep_alive)
        msgs = [Message("system", body.system)] if body.system else []
        msgs.append(Message("user", body.prompt))
        schema = body.response_schema()
        if body.context:
            # continue a previous reply's context (its final chunk's "context"): the new turn is appended as tokens
            model_id = await state.ensure_loaded(body.model, ka)
            text = body.prompt
            if not body.raw:
                text = (await asyncio.to_thread(state.chat.prepare, model_id, msgs)).prompt
            more = await asyncio.to_thread(
                state.runtime.tokenize, model_id, text, add_special=False, parse_special=True
            )
            run = await start_text(state, body.model, [*body.context, *more], params, response_schema=schema)
        elif body.raw:
            run = await start_text(state, body.model, body.prompt, params, response_schema=schema, keep_alive_s=ka)
        else:
            run = await start_chat(state, body.model, msgs, params, response_schema=schema, keep_alive_s=ka)
    except ErllamaError as exc:
        return map_error(exc)

    def piece(text: str, thinking: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": body.model, "created_at": _now(), "response": text, "done": False}
        if thinking is not None:
            out["thinking"] = thinking
        return out

    def final(end: End) -> dict[str, Any]:
        body_ = {**piece(end.result.content if not body.stream else ""), **_final(end.completion, started)}
        body_["context"] = list(end.completion.context_tokens)
        if not body.stream and end.result.thinking:
            body_["thinking"] = end.result.thinking
        return body_

    if body.stream:
        return _ndjson(run, piece, lambda text: piece("", text), final)
    try:
        return final(await collect(run, request))
    except ErllamaError as exc:
        return map_error(exc)


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    started = time.perf_counter()
    try:
        if not body.messages:
            done = await _load_or_unload(state, body.model, body.keep_alive)
            message = {"role": "assistant", "content": ""}
            return {"model": body.model, "created_at": _now(), "message": message, "done": True, **done}
        if len(body.messages) > state.config.max_messages:
            raise InvalidInputError(f"more than {state.config.max_messages} messages")
        tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or ()]
        run = await start_chat(
            state,
            body.model,
            [m.neutral() for m in body.messages],
            body.params(state.default_max_tokens),
            tools=tools,
            response_schema=body.response_schema(),
            keep_alive_s=keep_alive_s(body.keep_alive),
        )
    except ErllamaError as exc:
        return map_error(exc)

    def piece(message: dict[str, Any]) -> dict[str, Any]:
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", **message}, "done": False}

    def final(end: End, streamed: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"content": "" if streamed else end.result.content}
        if end.result.thinking and not streamed:
            message["thinking"] = end.result.thinking
        if end.result.tool_calls:
            message["tool_calls"] = _calls(end.result)
        return {**piece(message), **_final(end.completion, started)}

    if body.stream:
        return _ndjson(
            run,
            lambda text: piece({"content": text}),
            lambda text: piece({"content": "", "thinking": text}),
            lambda end: final(end, streamed=True),
        )
    try:
        return final(await collect(run, request), streamed=False)
    except ErllamaError as exc:
        return map_error(exc)


@router.post("/api/embed")
async def embed(body: EmbedRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    started = time.perf_counter()
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    try:
        model_id = await state.ensure_loaded(body.model, keep_alive_s(body.keep_alive))
        vectors, count = [], 0
        for text in inputs:
            vectors.append(await asyncio.to_thread(state.runtime.embed, model_id, text))
            count += len(await asyncio.to_thread(state.runtime.tokenize, model_id, text, parse_special=True))
    except ErllamaError as exc:
        return map_error(exc)
    return {
        "model": body.model,
        "embeddings": vectors,
        "total_duration": _ns(time.perf_counter() - started),
        "load_duration": 0,
        "prompt_eval_count": count,
    }


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    try:
        model_id = await state.ensure_loaded(body.model, keep_alive_s(body.keep_alive))
        vector = await asyncio.to_thread(state.runtime.embed, model_id, body.prompt) if body.prompt else []
    except ErllamaError as exc:
        return map_error(exc)
    return {"embedding": vector}


def _details(info: dict[str, Any] | None) -> dict[str, Any]:
    info = info or {}
    return {
        "parent_model": "",
        "format": "gguf",
        "family": str(info.get("architecture", "")),
        "families": [str(info.get("architecture", ""))] if info.get("architecture") else None,
        "parameter_size": _human(int(info.get("n_params", 0) or 0)),
        "quantization_level": str(info.get("quantization", "")),
    }


def _human(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _file_info(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {
        "modified_at": datetime.datetime.fromtimestamp(stat.st_mtime, datetime.UTC).isoformat(),
        "size": stat.st_size,
        "digest": file_digest(path),
    }


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.erllama
    out = []
    for name, path in sorted(state.available().items()):
        if path is not None:
            info = await asyncio.to_thread(_file_info, path)  # hashes a new file once; off the event loop
        else:
            info = {"modified_at": _now(), "size": 0, "digest": ""}
        loaded = state.loaded().get(name)
        details = _details(state.runtime.model_info(loaded[0]) if loaded else None)
        out.append({"name": name, "model": name, **info, "details": details})
    return {"models": out}


@router.post("/api/show")
async def show(body: ModelRef, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    try:
        model_id = await state.ensure_loaded(body.model)
        info = state.runtime.model_info(model_id)
    except ErllamaError as exc:
        return map_error(exc)
    template = state.chat.template(model_id)
    capabilities = ["completion", "tools"] + (["thinking"] if template and "<think>" in template.source else [])
    return {
        "modelfile": f"FROM {info.get('path') or body.model}\n",
        "parameters": "",
        "template": info.get("chat_template") or "",
        "details": _details(info),
        "model_info": {
            "general.architecture": info.get("architecture", ""),
            "general.parameter_count": info.get("n_params", 0),
            "context_length": info.get("n_ctx_seq", 0),
        },
        "capabilities": capabilities,
    }


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.erllama
    out = []
    for name, (model_id, expires) in sorted(state.loaded().items()):
        info = state.runtime.model_info(model_id)
        size = int(info.get("size_bytes", 0) or 0)
        expires_at = (
            datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat()
            if expires is not None
            else "2318-01-01T00:00:00Z"
        )
        out.append(
            {
                "name": name,
                "model": name,
                "size": size,
                "digest": "",
                "details": _details(info),
                "expires_at": expires_at,
                "size_vram": 0,
                "context_length": int(info.get("n_ctx_seq", 0) or 0),
            }
        )
    return {"models": out}


def _managed(state: ServerState) -> ManagedSource:
    if not isinstance(state.source, ManagedSource):
        raise InvalidInputError("this server has no model store to pull into, delete from or copy within")
    return state.source


@router.post("/api/pull")
async def pull(body: ModelRef, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    try:
        source = _managed(state)
        steps: Iterator[dict[str, Any]] = source.pull(body.model)
        first = await asyncio.to_thread(next, steps)  # validates the name before the 200 goes out
    except ErllamaError as exc:
        return map_error(exc)

    async def progress() -> AsyncIterator[dict[str, Any]]:
        yield first
        done = object()
        try:
            while (step := await asyncio.to_thread(next, steps, done)) is not done:
                yield step  # type: ignore[misc]
        except (ErllamaError, OSError, RuntimeError) as exc:
            yield {"error": str(exc)}

    if body.stream:

        async def lines() -> AsyncIterator[bytes]:
            async for step in progress():
                yield _line(step)

        return StreamingResponse(lines(), media_type=_NDJSON)
    last: dict[str, Any] = first
    async for step in progress():
        last = step
    return JSONResponse(last, status_code=502 if "error" in last else 200)  # the source failed us, not the client


@router.delete("/api/delete")
async def delete(body: ModelRef, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    try:
        source = _managed(state)
        await state.unload(body.model)
        await asyncio.to_thread(source.delete, body.model)
    except ErllamaError as exc:
        return map_error(exc)
    return JSONResponse({}, status_code=200)


@router.post("/api/copy")
async def copy(body: CopyRequest, request: Request) -> Any:
    state: ServerState = request.app.state.erllama
    try:
        await asyncio.to_thread(_managed(state).copy, body.source, body.destination)
    except ErllamaError as exc:
        return map_error(exc)
    return JSONResponse({}, status_code=200)
