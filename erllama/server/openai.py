"""The OpenAI dialect: chat completions, completions (JSON or SSE), embeddings and models, in OpenAI's envelope.

Wire types are the pydantic models of :mod:`erllama.server.openai_wire`; they are turned into
:mod:`erllama.chat.types` before anything else sees them. A client that disconnects mid-stream cancels its
request (the stream's consumer goes away).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from erllama.chat import ChatResult, Tool
from erllama.errors import ErllamaError, InvalidInputError, PromptTooLongError
from erllama.runtime import Completion, TokenLogprob
from erllama.server.chat import ChatRun, End, Error, Event, Text, collect, llama_timings, start_chat_choices, start_text
from erllama.server.errors import failure
from erllama.server.openai_wire import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from erllama.server.prompts import resolve_prompt, truncate_embedding
from erllama.server.state import ServerState, StateDep

__all__ = ["router"]  # wire types and helpers stay inside the dialect

router = APIRouter()


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
    if isinstance(f.exc, PromptTooLongError):
        param = "messages"
        # llama-server's fields too (its clients read them to trim the conversation)
        body = {"error": {"message": f.message, "type": kind, "param": param, "code": f.code,
                          "n_prompt_tokens": f.exc.prompt_tokens, "n_ctx": f.exc.n_ctx}}  # fmt: skip
        return JSONResponse(body, status_code=status, headers=f.headers)
    return error_response(status, f.message, kind, param, f.code or code, headers=f.headers)


def _usage(done: Sequence[Completion], per_prompt: int | None = None) -> dict[str, Any]:
    """Usage of a request's choices: a prompt counts once however many choices it has (``per_prompt`` choices
    each, in order; all of them by default), completions add up."""
    step = per_prompt or len(done) or 1
    prompt = sum(c.stats.prompt_tokens for c in done[::step])
    cached = sum(c.stats.restored_tokens for c in done[::step])
    generated = sum(c.stats.generated_tokens for c in done)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _stream_error(exc: BaseException) -> dict[str, Any]:
    """An error after a stream's 200 went out (the model failed mid-reply), in OpenAI's error shape."""
    f = failure(exc)
    _, kind, _, code = _FAILURES[f.kind]
    return {"error": {"message": f.message, "type": kind, "param": None, "code": f.code or code}}


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


Scored = tuple[int, bytes, TokenLogprob | None]  # a token, its piece, its log-probability (None: the first)


def _scored(lps: Sequence[TokenLogprob]) -> list[Scored]:
    return [(lp.token, lp.piece, lp) for lp in lps]


def _legacy_logprobs(entries: Sequence[Scored], offset: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion (the legacy shape). An echoed prompt's first token has no
    log-probability: null, as OpenAI reports it."""
    tokens, offsets = [], []
    for _, piece, _ in entries:
        text = piece.decode("utf-8", "replace")
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob if lp is not None else None for _, _, lp in entries],
        "top_logprobs": [
            {p.decode("utf-8", "replace"): v for _, p, v in lp.top} if lp is not None else None for _, _, lp in entries
        ],
        "text_offset": offsets,
    }


def _tool_calls(result: ChatResult) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in result.tool_calls
    ]


@router.get("/v1/models")
async def list_models(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(name, state) for name in sorted(state.available())]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, state: StateDep) -> Any:
    if state.canonical(model_id) not in state.available():  # any name a request may use: "smollm2" too
        return error_response(
            404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
        )
    return _model_card(model_id, state)


def _model_card(name: str, state: ServerState) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.started, "owned_by": state.config.owned_by}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep) -> Any:
    if len(body.messages) > state.config.max_messages:
        return error_response(400, f"more than {state.config.max_messages} messages", "invalid_request_error")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or ()]
    runs = await start_chat_choices(
        state,
        body.model or "",
        body.neutral(),
        body.params(max_tokens if max_tokens is not None else state.default_max_tokens),
        body.n,
        tools=tools,
        tool_choice=body.choice(),
        response_schema=body.response_schema(),
        continue_final=body.continues(),
        grammar=body.grammar,
    )
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    model = runs[0].name
    created = int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _chat_sse(
                runs, ident, created, model, include_usage=usage, logprobs=body.logprobs, timings=body.timings_per_token
            ),
            media_type="text/event-stream",
            headers=_NO_BUFFER,
        )
    ends = await _collect_all(runs, request)
    choices = []
    for index, end in enumerate(ends):
        message: dict[str, Any] = {"role": "assistant", "content": end.result.content or None}
        if end.result.tool_calls:
            message["tool_calls"] = _tool_calls(end.result)
        elif message["content"] is None:
            message["content"] = ""
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": _chat_logprobs(end.completion.logprobs) if body.logprobs else None,
                "finish_reason": _finish_reason(end.completion, end.result),
            }
        )
    out: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "system_fingerprint": _fingerprint(),
        "model": model,
        "choices": choices,
        "usage": _usage([e.completion for e in ends]),
    }
    if body.timings_per_token:
        out["timings"] = llama_timings(ends[0].completion)
    if body.verbose and runs[0].prepared is not None:
        out["__verbose"] = {"prompt": runs[0].prepared.prompt, "template": runs[0].prepared.template}
    return out


@router.post("/v1/chat/completions/input_tokens")
async def chat_input_tokens(body: ChatCompletionRequest, state: StateDep) -> Any:
    """llama-server's count of the prompt a chat request would run (``{"input_tokens": n}``), nothing generated."""
    model_id = await state.ensure_loaded(body.model)
    tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or ()]
    prepared = await asyncio.to_thread(
        state.chat.prepare,
        model_id,
        [m.neutral() for m in body.messages],
        tools=tools,
        tool_choice=body.choice(),
        response_schema=body.response_schema(),
        continue_final=body.continues(),
    )
    tokens = await asyncio.to_thread(state.runtime.tokenize, model_id, prepared.prompt, parse_special=True)
    return {"input_tokens": len(tokens)}


async def _collect_all(runs: list[ChatRun], request: Request) -> list[End]:
    """Every run to its end, together; the first error ends the others too."""
    try:
        return list(await asyncio.gather(*(collect(run, request) for run in runs)))
    finally:
        for run in runs:
            run.close()


async def _merged(runs: list[ChatRun]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several runs as they come, each with its run's index; leaving early ends them all."""
    if len(runs) == 1:
        async for event in runs[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    async def pump(index: int, run: ChatRun) -> None:
        try:
            async for event in run.events():
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        left = len(runs)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            run.close()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Any:
    n_scored = body.logprobs if body.echo and body.logprobs is not None else None
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's documented default
    runs: list[ChatRun] = []
    echoes: list[tuple[str, list[Scored]]] = []
    try:
        prompts = body.prompts()
        params = body.params(max_tokens)
        if body.grammar:
            params = dataclasses.replace(params, sampling=dataclasses.replace(params.sampling, grammar=body.grammar))
        if body.grammar and body.json_schema is not None:
            raise InvalidInputError("give either grammar or json_schema, not both")
        model_id = await state.ensure_loaded(body.model)
        state.check_choices(model_id, len(prompts) * body.n)
        async with state.fanout(model_id, len(prompts) * body.n):
            for prompt in prompts:
                echoes.append(await _echo(state, model_id, prompt, n_scored) if body.echo else ("", []))
                runs.extend(
                    await start_text(
                        state, body.model or "", prompt, params, response_schema=body.json_schema, n=body.n
                    )
                )
    except ErllamaError:  # the app's handler answers it in this dialect's envelope
        for run in runs:
            run.close()
        raise
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, text: str, finish: str | None, lps: Sequence[Scored] | None = None) -> dict[str, Any]:
        logprobs = _legacy_logprobs(lps) if lps is not None and body.logprobs is not None else None
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        model = runs[0].name if runs else body.model
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": _fingerprint(),
            "choices": [choice],
        }

    def echo_of(index: int) -> tuple[str, list[Scored]]:
        return echoes[index // body.n]

    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage

        async def sse() -> AsyncIterator[bytes]:
            done: list[Completion] = []
            if body.echo:
                for index in range(len(runs)):
                    text, lps = echo_of(index)
                    yield _data(chunk(index, text, None, lps if n_scored is not None else None))
            async for index, event in _merged(runs):
                if isinstance(event, Text):
                    yield _data(chunk(index, event.text, None, _scored(event.logprobs)))
                elif isinstance(event, End):
                    done.append(event.completion)
                    yield _data(chunk(index, "", _finish_reason(event.completion)))
                elif isinstance(event, Error):
                    yield _data(_stream_error(event.error))
            if usage and done:
                yield _data({**chunk(0, "", None), "choices": [], "usage": _usage(done, per_prompt=body.n)})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=_NO_BUFFER)
    ends = await _collect_all(runs, request)
    choices = []
    for index, end in enumerate(ends):
        c = end.completion
        text, lps = echo_of(index)
        scored = [*lps, *_scored(c.logprobs)] if n_scored is not None else _scored(c.logprobs)
        choices.append(chunk(index, text + c.reply, _finish_reason(c), scored)["choices"][0])
    return {**chunk(0, "", None), "choices": choices, "usage": _usage([e.completion for e in ends], per_prompt=body.n)}


async def _echo(
    state: ServerState, model_id: str, prompt: str | list[int], top_n: int | None
) -> tuple[str, list[Scored]]:
    """The prompt as ``echo`` returns it: its text, and with logprobs its tokens scored (the first one null)."""
    rt = state.runtime
    text = prompt if isinstance(prompt, str) else await asyncio.to_thread(rt.detokenize, model_id, prompt)
    if top_n is None:
        return text, []
    return text, await asyncio.to_thread(rt.prompt_logprobs, model_id, prompt, top_n)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: StateDep) -> Any:
    rt = state.runtime
    inputs = body.inputs()
    model_id = await state.ensure_loaded(body.model)
    data, n_tokens = [], 0
    for i, given in enumerate(inputs):
        item = await asyncio.to_thread(resolve_prompt, state, model_id, given)
        vector = await asyncio.to_thread(rt.embed, model_id, item)
        if isinstance(item, str):
            n_tokens += len(await asyncio.to_thread(rt.tokenize, model_id, item, parse_special=True))
        else:
            n_tokens += len(item)
        if body.dimensions is not None:
            vector = truncate_embedding(vector, body.dimensions)
        encoded: Any = vector
        if body.encoding_format == "base64":
            encoded = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": body.model or state.served_name(None),
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


@functools.cache
def _fingerprint() -> str:
    """OpenAI's ``system_fingerprint``: what served the reply (erllama's version and the llama.cpp build)."""
    import erllama

    try:
        from erllama._native import library

        source = str(library().manifest.get("source_id", "")).removeprefix("git-")[:12]
    except ImportError:
        source = "unknown"
    return f"erllama-{erllama.__version__}-llama.cpp-{source}"


def _data(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


_NO_BUFFER = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _chat_sse(
    runs: list[ChatRun],
    ident: str,
    created: int,
    model: str,
    *,
    include_usage: bool,
    logprobs: bool,
    timings: bool = False,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _fingerprint(),
            "choices": choices,
        }
        return {**body, "usage": None} if include_usage else body

    def delta(
        index: int,
        content: dict[str, Any],
        finish: str | None,
        lps: tuple[TokenLogprob, ...] | None = None,
        done: Completion | None = None,
    ) -> bytes:
        choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
        if lps is not None:
            choice["logprobs"] = _chat_logprobs(lps)
        body = chunk([choice])
        if timings and done is not None:
            body["timings"] = llama_timings(done)
        return _data(body)

    for index in range(len(runs)):
        yield delta(index, {"role": "assistant", "content": None}, None)  # null, as llama-server sends it
    done: list[Completion] = []
    async for index, event in _merged(runs):
        if isinstance(event, Text):
            yield delta(index, {"content": event.text}, None, event.logprobs if logprobs else None)
        elif isinstance(event, End):
            for i, call in enumerate(_tool_calls(event.result)):
                yield delta(index, {"tool_calls": [{"index": i, **call}]}, None)
            yield delta(index, {}, _finish_reason(event.completion, event.result), done=event.completion)
            done.append(event.completion)
        elif isinstance(event, Error):  # an error after the 200 went out
            yield _data(_stream_error(event.error))
    if include_usage and done:
        last = {**chunk([]), "usage": _usage(done)}
        if timings:
            last["timings"] = llama_timings(done[0])
        yield _data(last)
    yield b"data: [DONE]\n\n"
