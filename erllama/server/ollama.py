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
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

import erllama
from erllama.cache.report import CacheReport
from erllama.chat import ChatResult, Message, Tool
from erllama.errors import ErllamaError, InvalidInputError, UnknownModelError
from erllama.runtime import Completion, TokenLogprob
from erllama.server.chat import ChatRun, End, Error, Text, Thinking, collect, start_chat, start_text
from erllama.server.errors import failure
from erllama.server.models import file_digest
from erllama.server.ollama_wire import (
    ChatRequest,
    CopyRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRef,
)
from erllama.server.prompts import fim_prompt, truncate_embedding
from erllama.server.state import ManagedSource, ServerState, StateDep
from erllama.store.info import read_header, summarize

__all__ = ["router"]  # wire types and helpers stay inside the dialect

router = APIRouter()
log = logging.getLogger("erllama.server")

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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _final(c: Completion, started: float, report: CacheReport | None = None) -> dict[str, Any]:
    """The last chunk's counts. ``report``: the run's cache report as admitted (with the message its divergence
    falls in, when worked out), else the completion's."""
    s = c.stats
    report = report or c.cache
    cache: dict[str, Any] = {
        "hit": c.cache_hit_kind,
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.restored_tokens,
    }
    if report is not None:
        cache.update((k, v) for k, v in report.as_dict().items() if v is not None)
    return {
        "done": True,
        "done_reason": "length" if c.finish_reason == "length" else "stop",
        "total_duration": _ns(time.perf_counter() - started),
        "load_duration": 0,
        # as Ollama counts since its 0.30 runner (ollama#16428): the whole prompt, cached tokens included; the
        # cached ones again in prompt_eval_cached_count (ollama#17943)
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_cached_count": s.restored_tokens,
        "prompt_eval_duration": _ns(s.ttft_s),
        "eval_count": s.generated_tokens,
        "eval_duration": _ns(s.generate_s),
        # erllama's own (Ollama clients ignore it): how the prompt cache served this request, and why not more
        "cache": cache,
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


def _logprobs(lps: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Ollama's ``logprobs`` entries: each token with its log-probability, bytes and its top alternatives."""

    def one(piece: bytes, logprob: float) -> dict[str, Any]:
        return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}

    return [{**one(lp.piece, lp.logprob), "top_logprobs": [one(p, v) for _, p, v in lp.top]} for lp in lps]


def _ndjson(
    run: ChatRun, text: Chunk, thinking: Chunk, end: Callable[[End], dict[str, Any]], logprobs: bool = False
) -> StreamingResponse:
    """A run streamed as NDJSON: one line per text / thinking piece, the final line, or an error line."""

    async def lines() -> AsyncIterator[bytes]:
        async for event in run.events():
            if isinstance(event, Text):
                line = text(event.text)
                if logprobs:
                    line["logprobs"] = _logprobs(event.logprobs)
                yield _line(line)
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


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # the ollama CLI's heartbeat is HEAD /
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": erllama.__version__}


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request, state: StateDep) -> Any:
    started = time.perf_counter()
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
    if body.suffix:
        # fill in the middle: the reply is the text between the prompt and the suffix (as Ollama's insert)
        model_id = await state.ensure_loaded(body.model, ka)
        tokens = await asyncio.to_thread(fim_prompt, state, model_id, body.prompt, body.suffix)
        (run,) = await start_text(state, body.model, tokens, params, response_schema=schema, keep_alive_s=ka)
    elif body.context:
        # continue a previous reply's context (its final chunk's "context"): the new turn is appended as tokens
        model_id = await state.ensure_loaded(body.model, ka)
        text = body.prompt
        if not body.raw:
            text = (await asyncio.to_thread(state.chat.prepare, model_id, msgs)).prompt
        more = await asyncio.to_thread(state.runtime.tokenize, model_id, text, add_special=False, parse_special=True)
        (run,) = await start_text(state, body.model, [*body.context, *more], params, response_schema=schema)
    elif body.raw:
        (run,) = await start_text(state, body.model, body.prompt, params, response_schema=schema, keep_alive_s=ka)
    else:
        run = await start_chat(state, body.model, msgs, params, response_schema=schema, keep_alive_s=ka)

    def piece(text: str, thinking: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": body.model, "created_at": _now(), "response": text, "done": False}
        if thinking is not None:
            out["thinking"] = thinking
        return out

    def final(end: End) -> dict[str, Any]:
        body_ = {
            **piece(end.result.content if not body.stream else ""),
            **_final(end.completion, started, run.started.cache),
        }
        body_["context"] = list(end.completion.context_tokens)
        if not body.stream and end.result.thinking:
            body_["thinking"] = end.result.thinking
        if not body.stream and body.logprobs:
            body_["logprobs"] = _logprobs(end.completion.logprobs)
        return body_

    if body.stream:
        return _ndjson(run, piece, lambda text: piece("", text), final, body.logprobs)
    return final(await collect(run, request))


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request, state: StateDep) -> Any:
    started = time.perf_counter()
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
        [m.neutral(i) for i, m in enumerate(body.messages)],
        body.params(state.default_max_tokens),
        tools=tools,
        response_schema=body.response_schema(),
        keep_alive_s=keep_alive_s(body.keep_alive),
    )

    def piece(message: dict[str, Any]) -> dict[str, Any]:
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", **message}, "done": False}

    def final(end: End, streamed: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"content": "" if streamed else end.result.content}
        if end.result.thinking and not streamed:
            message["thinking"] = end.result.thinking
        if end.result.tool_calls:
            message["tool_calls"] = _calls(end.result)
        out = {**piece(message), **_final(end.completion, started, run.started.cache)}
        if not streamed and body.logprobs:
            out["logprobs"] = _logprobs(end.completion.logprobs)
        return out

    if body.stream:
        return _ndjson(
            run,
            lambda text: piece({"content": text}),
            lambda text: piece({"content": "", "thinking": text}),
            lambda end: final(end, streamed=True),
            body.logprobs,
        )
    return final(await collect(run, request), streamed=False)


@router.post("/api/embed")
async def embed(body: EmbedRequest, state: StateDep) -> Any:
    started = time.perf_counter()
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    model_id = await state.ensure_loaded(body.model, keep_alive_s(body.keep_alive))
    vectors, count = [], 0
    for text in inputs:
        vector = await asyncio.to_thread(state.runtime.embed, model_id, text)
        vectors.append(truncate_embedding(vector, body.dimensions) if body.dimensions else vector)
        count += len(await asyncio.to_thread(state.runtime.tokenize, model_id, text, parse_special=True))
    return {
        "model": body.model,
        "embeddings": vectors,
        "total_duration": _ns(time.perf_counter() - started),
        "load_duration": 0,
        "prompt_eval_count": count,
    }


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsRequest, state: StateDep) -> Any:
    model_id = await state.ensure_loaded(body.model, keep_alive_s(body.keep_alive))
    vector = await asyncio.to_thread(state.runtime.embed, model_id, body.prompt) if body.prompt else []
    return {"embedding": vector}


@functools.lru_cache(maxsize=64)
def _header(path: str, _size: int, _mtime_ns: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, scalar metadata) of a GGUF file, read from its header once per file version (~0.1 s, no load)."""
    meta, tensors = read_header(Path(path))
    return summarize(meta, tensors), {k: None if isinstance(v, list) else v for k, v in meta.items()}


def _gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    st = path.stat()
    return _header(str(path), st.st_size, st.st_mtime_ns)


def _details(summary: dict[str, Any] | None) -> dict[str, Any]:
    summary = summary or {}
    arch = str(summary.get("architecture", ""))
    params = int(summary.get("parameters", 0) or 0)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": _human(params) if params else str(summary.get("size_label", "")),
        "quantization_level": str(summary.get("quantization", "")),
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


def _path_of(state: ServerState, name: str) -> Path:
    """The GGUF file of a served or loadable model, without loading it. Raises UnknownModelError."""
    served = state.canonical(name)
    loaded = state.loaded().get(served)
    if loaded is not None:
        info = state.runtime.model_info(loaded[0])
        path = info.get("path") or info.get("gguf_path")
        if path:
            return Path(path)
    found = state.available().get(served)
    if found is None:
        raise UnknownModelError(f"The model '{name}' does not exist")
    return found


def _describe(state: ServerState, name: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The model's file, and what its header says (empty when the file is not a readable GGUF)."""
    path = _path_of(state, name)
    try:
        summary, meta = _gguf(path)
    except OSError as exc:  # ChecksumError (not a GGUF, a corrupt header) too
        log.warning("model %s: cannot read the GGUF header of %s (%s)", name, path, exc)
        return path, {}, {}
    return path, summary, meta


@router.get("/api/tags")
async def tags(state: StateDep) -> dict[str, Any]:
    out = []
    for name in sorted(state.available()):
        try:
            path, summary, _ = await asyncio.to_thread(_describe, state, name)
            info = await asyncio.to_thread(_file_info, path)  # hashes a new file once; off the event loop
        except (ErllamaError, OSError):
            continue  # removed or unreadable since it was listed
        out.append({"name": name, "model": name, **info, "details": _details(summary)})
    return {"models": out}


@router.post("/api/show")
async def show(body: ModelRef, state: StateDep) -> Any:
    """What a model is, from its GGUF header: the model is not loaded (a UI shows every listed model)."""
    path, summary, meta = await asyncio.to_thread(_describe, state, body.model)
    template = str(summary.get("chat_template", ""))
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if "<think>" in template:
        capabilities.append("thinking")
    arch = str(summary.get("architecture", ""))
    model_info = {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
    model_info["general.parameter_count"] = int(summary.get("parameters", 0) or 0)
    return {
        "modelfile": f"FROM {path}\n",
        "parameters": "",
        "template": template,
        "details": _details(summary),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC).isoformat(),
        "license": str(summary.get("license", "")),
        **({"context_length": int(meta.get(f"{arch}.context_length") or 0)} if arch else {}),
    }


_NEVER = "2318-01-01T00:00:00Z"  # as Ollama's API reports a model that never expires (now + Go's longest duration)


@router.get("/api/ps")
async def ps(state: StateDep) -> dict[str, Any]:
    out = []
    for name, (model_id, expires) in sorted(state.loaded().items()):
        info = state.runtime.model_info(model_id)
        try:
            path, summary, _ = await asyncio.to_thread(_describe, state, name)
            size, digest = path.stat().st_size, await asyncio.to_thread(file_digest, path)
        except (ErllamaError, OSError):
            summary, size, digest = {}, int(info.get("file_size_bytes", 0) or 0), ""
        expires_at = (
            datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat().replace("+00:00", "Z")
            if expires is not None
            else _NEVER
        )
        out.append(
            {
                "name": name,
                "model": name,
                "size": size,
                "digest": digest,
                "details": _details(summary),
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
async def pull(body: ModelRef, state: StateDep) -> Any:
    source = _managed(state)
    steps: Iterator[dict[str, Any]] = source.pull(body.model)
    first = await asyncio.to_thread(next, steps)  # validates the name before the 200 goes out

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
async def delete(body: ModelRef, state: StateDep) -> Any:
    source = _managed(state)
    await state.unload(body.model)
    await asyncio.to_thread(source.delete, body.model)
    return JSONResponse({}, status_code=200)


@router.post("/api/copy")
async def copy(body: CopyRequest, state: StateDep) -> Any:
    await asyncio.to_thread(_managed(state).copy, body.source, body.destination)
    return JSONResponse({}, status_code=200)
