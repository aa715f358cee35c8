"""llama-server's own API, the subset that fits erllama: ``/completion`` (and ``/completions``), ``/infill``,
``/tokenize``, ``/detokenize``, ``/apply-template``, ``/props``, a read-only ``/slots``, and the OpenAI routes
without their ``/v1`` prefix (``/chat/completions``, ``/embeddings``, ``/models``), which llama-server's clients
post to. Editors' infill plugins, chat front ends and llama.cpp's own server test suite talk to it unchanged
(``scripts/llama-server-suite``).

Requests may name no model (the default model answers, see ``ServerConfig.model_fallback``). Sampling defaults
are llama-server's (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05); ``n_predict: -1`` (the default) lets the
reply use what the context leaves. ``cache_prompt`` is accepted and always on: erllama's cache is what serves
prompts. Errors use llama-server's envelope ``{"error": {"code", "message", "type"}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from erllama.chat import Message
from erllama.errors import ErllamaError, InvalidInputError, PromptTooLongError
from erllama.runtime import Completion, TokenLogprob
from erllama.sampling import SamplerConfig
from erllama.server import openai
from erllama.server.chat import ChatRun, End, Error, Params, Text, collect, llama_timings, start_text
from erllama.server.errors import failure
from erllama.server.openai_wire import ChatCompletionRequest, ChatMessage
from erllama.server.prompts import PromptParts, fim_markers, fim_prompt, resolve_prompt, split_prompts
from erllama.server.state import ServerState, StateDep

__all__ = ["router"]

router = APIRouter()

_STATUS = {"not_found": 404, "invalid": 400, "busy": 503, "stopped": 503, "internal": 500}
_TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "unavailable_error", 500: "server_error"}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """llama-server's error envelope."""
    body = {"error": {"code": status, "message": message, "type": _TYPES.get(status, "server_error")}}
    return JSONResponse(body, status_code=status, headers=headers)


def map_error(exc: BaseException) -> JSONResponse:
    f = failure(exc)
    if isinstance(f.exc, PromptTooLongError):
        e = f.exc
        error = {"code": 400, "message": f.message, "type": "exceed_context_size_error",
                 "n_prompt_tokens": e.prompt_tokens, "n_ctx": e.n_ctx}  # fmt: skip
        return JSONResponse({"error": error}, status_code=400)
    return error_response(_STATUS[f.kind], f.message, f.headers)


# a text, token ids mixed with texts, a JSON prompt object ({"prompt_string": ..., "multimodal_data": [...]}),
# or a list of those
Prompt = str | list[str | int | list[str | int] | dict[str, Any]] | dict[str, Any]


def _json_prompt(item: dict[str, Any]) -> str:
    """llama-server's JSON prompt object: its text (``prompt_string``); multimodal data is refused (text models)."""
    if item.get("multimodal_data"):
        raise InvalidInputError("multimodal_data: this model takes text only (erllama serves text models)")
    text = item.get("prompt_string")
    if not isinstance(text, str):
        raise InvalidInputError("a JSON prompt object needs a prompt_string text")
    return text


class CompletionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    prompt: Prompt = ""
    n_predict: int = -1
    temperature: Annotated[float, Field(ge=0.0)] = 0.8
    top_k: Annotated[int, Field(ge=0, lt=2**31)] = 40
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    typical_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    repeat_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    repeat_last_n: Annotated[int, Field(ge=-1, lt=2**31)] = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False
    n_probs: Annotated[int, Field(ge=0, le=20)] = 0
    post_sampling_probs: bool = False
    cache_prompt: bool = True
    return_tokens: bool = False
    ignore_eos: bool = False
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    logit_bias: list[list[Any]] | dict[str, float] | None = None
    id_slot: int = -1
    response_fields: list[str] | None = None

    def prompts(self) -> list[str | PromptParts]:
        """The request's prompts (llama-server's reading: :func:`split_prompts`, JSON prompt objects as texts)."""
        p = self.prompt
        if isinstance(p, dict):
            return [_json_prompt(p)]
        return split_prompts([_json_prompt(x) if isinstance(x, dict) else x for x in p] if isinstance(p, list) else p)

    def params(self, eog: Sequence[int], tokenize: Callable[[str], list[int]]) -> Params:
        """The generation parameters. ``logit_bias`` as llama-server takes it: ``[[token, bias], ...]`` or
        ``{token: bias}``, where a token is an id or a text (every token of it gets the bias) and a bias of
        ``false`` bans the token."""
        bias: dict[int, float] = {}
        if isinstance(self.logit_bias, dict):
            pairs: list[list[Any]] = [[k, v] for k, v in self.logit_bias.items()]
        else:
            pairs = list(self.logit_bias or ())
        for pair in pairs:
            ok = len(pair) == 2 and not isinstance(pair[0], bool) and isinstance(pair[0], int | str)
            if ok:
                ok = pair[1] is False or (isinstance(pair[1], int | float) and not isinstance(pair[1], bool))
            if not ok:
                raise InvalidInputError("logit_bias entries are [token id or text, bias or false] pairs")
            token, value = pair
            ids = [token] if isinstance(token, int) else [int(token)] if token.isdigit() else tokenize(token)
            for t in ids:
                bias[t] = _BANNED if value is False else float(value)
        if self.ignore_eos:
            bias.update(dict.fromkeys(eog, _BANNED))
        sampling = SamplerConfig(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            typical_p=self.typical_p,
            repeat_penalty=self.repeat_penalty,
            penalty_last_n=self.repeat_last_n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None or self.seed < 0 else self.seed,
            logit_bias=bias,
        )
        n = None if self.n_predict < 0 else self.n_predict
        return Params(n, list(self.stop or ()), sampling, logprobs=self.n_probs or None)


class InfillIn(CompletionIn):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[dict[str, str]] | None = None


class TokenizeIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False
    model: str = ""


class DetokenizeIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]
    model: str = ""


class TemplateIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str = ""


def _probs(lps: Sequence[TokenLogprob], post_sampling: bool = False) -> list[dict[str, Any]]:
    def one(token: int, piece: bytes, logprob: float) -> dict[str, Any]:
        return {"id": token, "token": piece.decode("utf-8", "replace"), "bytes": list(piece), "logprob": logprob}

    return [{**one(lp.token, lp.piece, lp.logprob), "top_logprobs": [one(*t) for t in lp.top]} for lp in lps]


def _settings(
    body: CompletionIn, n_ctx: int, max_tokens: int, params: Params | None, seed: int | None
) -> dict[str, Any]:
    """``generation_settings`` as llama-server reports them; ``seed`` is the daemon's default (``--seed``) that a
    request without one samples with, ``logit_bias`` every bias applied (a banned token's bias is null: -inf)."""
    bias = params.sampling.logit_bias if params is not None else {}
    return {
        "n_predict": body.n_predict,
        "max_tokens": max_tokens,
        "n_ctx": n_ctx,
        "seed": body.seed if body.seed is not None else seed if seed is not None else -1,
        "temperature": body.temperature,
        "top_k": body.top_k,
        "top_p": body.top_p,
        "min_p": body.min_p,
        "typical_p": body.typical_p,
        "repeat_penalty": body.repeat_penalty,
        "repeat_last_n": body.repeat_last_n,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "n_probs": body.n_probs,
        "post_sampling_probs": body.post_sampling_probs,
        "stop": body.stop or [],
        "ignore_eos": body.ignore_eos,
        "logit_bias": [{"token": t, "bias": None if b <= _BANNED else b} for t, b in bias.items()],
        "stream": body.stream,
        "grammar": body.grammar or "",
        "cache_prompt": True,
    }


_BANNED = -1e30  # the bias that bans a token (llama-server's false, ignore_eos); at or below it reads as -inf


def _stop_type(c: Completion) -> str:
    if c.stop_sequence is not None:
        return "word"
    return "limit" if c.finish_reason == "length" else "eos"


def _final(run: ChatRun, body: CompletionIn, params: Params, end: End, index: int, *, streamed: bool) -> dict[str, Any]:
    c = end.completion
    n_ctx = int(run.state.runtime.model_info(run.model_id).get("n_ctx_seq") or 0)
    out: dict[str, Any] = {
        "index": index,
        "content": "" if streamed else c.reply,
        "tokens": [] if streamed or not body.return_tokens else list(c.generated),
        "id_slot": index,
        "stop": True,
        "model": run.name,
        "tokens_predicted": c.stats.generated_tokens,
        "tokens_evaluated": c.stats.prompt_tokens,
        "generation_settings": _settings(body, n_ctx, run.started.max_tokens, params, run.state.config.default_seed),
        "prompt": "",
        "has_new_line": "\n" in c.reply,
        "truncated": False,
        "stop_type": _stop_type(c),
        "stopping_word": c.stop_sequence or "",
        "tokens_cached": c.stats.prompt_tokens + c.stats.generated_tokens,
        "timings": llama_timings(c),
    }
    if body.n_probs and not streamed:
        out["completion_probabilities"] = _probs(c.logprobs, body.post_sampling_probs)
    return _fields(out, body.response_fields) if body.response_fields else out


def _fields(out: dict[str, Any], wanted: Sequence[str]) -> dict[str, Any]:
    """llama-server's ``response_fields``: only these fields, a nested one named by its path (``a/b``) and keyed
    by it; a field the response lacks is left out."""
    picked: dict[str, Any] = {}
    for path in wanted:
        value: Any = out
        for part in path.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            picked[path] = value
    return picked


async def _start(
    state: ServerState, body: CompletionIn, prompts: Sequence[str | Sequence[str | int]]
) -> tuple[list[ChatRun], Params]:
    model_id = await state.ensure_loaded(body.model or None)
    eog = state.runtime.model_info(model_id).get("eog_tokens") or []

    def tokenize(text: str) -> list[int]:
        return state.runtime.tokenize(model_id, text, add_special=False, parse_special=False)

    params = await asyncio.to_thread(body.params, eog, tokenize)
    schema: Any = body.json_schema
    if body.grammar is not None and schema is not None:
        raise InvalidInputError("give either grammar or json_schema, not both")
    if body.grammar is not None:
        params = dataclasses.replace(params, sampling=dataclasses.replace(params.sampling, grammar=body.grammar))
    runs: list[ChatRun] = []
    state.check_choices(model_id, len(prompts))
    try:
        async with state.fanout(model_id, len(prompts)):
            for given in prompts:
                prompt = await asyncio.to_thread(resolve_prompt, state, model_id, given)
                runs.extend(await start_text(state, body.model or "", prompt, params, response_schema=schema))
    except BaseException:
        for run in runs:
            run.close()
        raise
    return runs, params


async def _complete(
    request: Request, state: ServerState, body: CompletionIn, prompts: Sequence[str | Sequence[str | int]]
) -> Any:
    if not prompts or any(not p for p in prompts):
        return error_response(400, "the prompt is empty")
    runs, params = await _start(state, body, prompts)
    if body.stream:
        return StreamingResponse(_sse(runs, body, params), media_type="text/event-stream", headers=_NO_BUFFER)
    try:
        ends = [await collect(run, request) for run in runs]
    except ErllamaError:  # the app's handler answers it in this dialect's envelope
        for run in runs:
            run.close()
        raise
    results = [
        _final(run, body, params, end, i, streamed=False) for i, (run, end) in enumerate(zip(runs, ends, strict=True))
    ]
    return results[0] if len(results) == 1 else results


_NO_BUFFER = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _data(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


async def _sse(runs: list[ChatRun], body: CompletionIn, params: Params) -> AsyncIterator[bytes]:
    for index, run in enumerate(runs):  # prompts of one request are streamed one after the other
        async for event in run.events():
            if isinstance(event, Text):
                chunk: dict[str, Any] = {
                    "index": index,
                    "content": event.text,
                    "tokens": [lp.token for lp in event.logprobs] or [-1],
                    "stop": False,
                    "id_slot": index,
                }
                if body.n_probs:
                    chunk["completion_probabilities"] = _probs(event.logprobs, body.post_sampling_probs)
                yield _data(chunk)
            elif isinstance(event, End):
                yield _data(_final(run, body, params, event, index, streamed=True))
            elif isinstance(event, Error):
                f = failure(event.error)
                code = _STATUS[f.kind]
                yield _data({"error": {"code": code, "message": f.message, "type": _TYPES.get(code, "server_error")}})


@router.post("/completion")
@router.post("/completions")
async def completion(body: CompletionIn, request: Request, state: StateDep) -> Any:
    prompts = body.prompts()
    return await _complete(request, state, body, prompts)


@router.post("/infill")
async def infill(body: InfillIn, request: Request, state: StateDep) -> Any:
    model_id = await state.ensure_loaded(body.model or None)
    prefix = "".join(f"{x.get('filename', '')}\n{x.get('text', '')}" for x in body.input_extra or ())
    prefix += body.input_prefix
    tokens = await asyncio.to_thread(fim_prompt, state, model_id, prefix, body.input_suffix)
    if isinstance(body.prompt, str) and body.prompt:
        tokens += await asyncio.to_thread(state.runtime.tokenize, model_id, body.prompt, add_special=False)
    return await _complete(request, state, body, [tokens])


@router.post("/tokenize")
async def tokenize(body: TokenizeIn, state: StateDep) -> Any:
    rt = state.runtime
    model_id = await state.ensure_loaded(body.model or None)
    tokens = await asyncio.to_thread(
        rt.tokenize, model_id, body.content, add_special=body.add_special, parse_special=body.parse_special
    )
    if not body.with_pieces:
        return {"tokens": tokens}
    pieces = []
    raws = await asyncio.to_thread(rt.token_pieces, model_id, tokens)
    for token, raw in zip(tokens, raws, strict=True):
        try:
            pieces.append({"id": token, "piece": raw.decode("utf-8")})
        except UnicodeDecodeError:  # part of a multi-byte character: its bytes, as llama-server gives them
            pieces.append({"id": token, "piece": list(raw)})
    return {"tokens": pieces}


@router.post("/detokenize")
async def detokenize(body: DetokenizeIn, state: StateDep) -> Any:
    model_id = await state.ensure_loaded(body.model or None)
    text = await asyncio.to_thread(state.runtime.detokenize, model_id, body.tokens)
    return {"content": text}


@router.post("/apply-template")
async def apply_template(body: TemplateIn, state: StateDep) -> Any:
    model_id = await state.ensure_loaded(body.model or None)
    messages: list[Message] = [m.neutral() for m in body.messages]
    prepared = await asyncio.to_thread(state.chat.prepare, model_id, messages)
    return {"prompt": prepared.prompt}


async def _queried_model(state: ServerState, request: Request) -> str:
    """The model id a GET asks about (``?model=``, else the default model)."""
    return await state.ensure_loaded(request.query_params.get("model") or None)


@router.get("/props")
async def props(request: Request, state: StateDep) -> Any:
    model_id = await _queried_model(state, request)
    info = state.runtime.model_info(model_id)
    n_ctx = int(info.get("n_ctx_seq") or 0)
    template = state.chat.template(model_id)
    return {
        "default_generation_settings": {
            "n_ctx": n_ctx,
            "params": _settings(CompletionIn(), n_ctx, n_ctx, None, state.config.default_seed),
        },
        "total_slots": state.slots(model_id),
        "model_alias": state.served_name(None) if state.default_model() else "",
        "model_path": str(info.get("path") or info.get("gguf_path") or ""),
        "chat_template": template.source if template is not None else str(info.get("chat_template") or ""),
        "bos_token": str(info.get("bos_text", "")),
        "eos_token": str(info.get("eos_text", "")),
        "modalities": {"vision": False, "audio": False},
        "infill": await asyncio.to_thread(fim_markers, state, model_id) is not None,
        "build_info": "erllama",
    }


@router.get("/slots")
async def slots(request: Request, state: StateDep) -> Any:
    """Read-only: the model's sequences and how many run now (erllama schedules sequences itself; there is no
    slot to pin, save or restore: the KV cache does that for every prompt)."""
    model_id = await _queried_model(state, request)
    info = state.runtime.model_info(model_id)
    _, running = state.queue_depth(model_id)
    n_ctx = int(info.get("n_ctx_seq") or 0)
    return [
        {"id": i, "n_ctx": n_ctx, "is_processing": i < running, "speculative": False}
        for i in range(state.slots(model_id))
    ]


@router.post("/slots/{slot_id}")
async def slot_action(slot_id: int) -> JSONResponse:
    return error_response(
        400, "slot save / restore / erase is not supported: erllama's KV cache saves and restores every prompt"
    )


def _as_llama_server(response: Any) -> Any:
    """An OpenAI route's answer as llama-server gives it on its un-prefixed routes: a prompt over the context is
    ``exceed_context_size_error`` (with ``n_prompt_tokens`` and ``n_ctx``, which the OpenAI route sends too)."""
    if isinstance(response, JSONResponse) and response.status_code == 400:
        body = json.loads(bytes(response.body))
        if body.get("error", {}).get("code") == "context_length_exceeded":
            body["error"]["type"] = "exceed_context_size_error"
            return JSONResponse(body, status_code=400)
    return response


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep) -> Any:
    """OpenAI's chat completions without the /v1 prefix, as llama-server serves them."""
    try:
        response = await openai.chat_completions(body, request, state)
    except ErllamaError as exc:
        response = openai.map_error(exc)
    return _as_llama_server(response)


# the other OpenAI routes without their /v1 prefix
router.add_api_route("/chat/completions/input_tokens", openai.chat_input_tokens, methods=["POST"])
router.add_api_route("/embeddings", openai.embeddings, methods=["POST"])
router.add_api_route("/models", openai.list_models, methods=["GET"])
