"""The OpenAI dialect over the stub backend, in process: JSON and SSE shapes, the official client, errors."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from erllama import Runtime
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.model import StubBackend
from erllama.server import ServerConfig, create_app

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say something nice"}]


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime = Runtime(CacheStore([RamTier(1 << 24)]), policy=SavePolicy(min_tokens=8))
    runtime.load_model(backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0), model_id="stub")
    yield runtime
    runtime.close()
    assert runtime.cache is not None
    runtime.cache.close()


def call(rt: Runtime, method: str, path: str, config: ServerConfig | None = None, **kw: Any) -> httpx.Response:
    app = create_app(rt, {"stub-1": "stub"}, config)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def sse_events(resp: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for block in resp.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_completion_json(rt: Runtime) -> None:
    body = {"model": "stub-1", "messages": MESSAGES, "max_tokens": 12}
    resp = call(rt, "POST", "/v1/chat/completions", json=body)
    assert resp.status_code == 200
    data = resp.json()
    expected = rt.complete(
        "stub", rt.apply_chat_template("stub", [(m["role"], m["content"]) for m in MESSAGES]), max_tokens=12
    )
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {"role": "assistant", "content": expected.reply}
    assert data["choices"][0]["finish_reason"] == "length"
    usage = data["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    again = call(rt, "POST", "/v1/chat/completions", json=body).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_chat_completion_stream_with_usage(rt: Runtime) -> None:
    body = {
        "model": "stub-1",
        "messages": MESSAGES,
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = call(rt, "POST", "/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 10
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    plain = call(rt, "POST", "/v1/chat/completions", json={**body, "stream": False}).json()
    assert text == plain["choices"][0]["message"]["content"]


def test_the_official_client_streams_and_not(rt: Runtime) -> None:
    app = create_app(rt, {"stub-1": "stub"})

    async def go() -> tuple[str, str, list[str]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            # this openai release types its client against its own httpx fork; an httpx client works the same
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=http)  # type: ignore[arg-type]
            messages: Any = MESSAGES
            whole = await client.chat.completions.create(model="stub-1", messages=messages, max_tokens=8)
            parts = []
            stream = await client.chat.completions.create(model="stub-1", messages=messages, max_tokens=8, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            models = [m.id async for m in client.models.list()]
            return whole.choices[0].message.content or "", "".join(parts), models

    whole, streamed, models = asyncio.run(go())
    assert whole == streamed
    assert len(whole) > 0
    assert models == ["stub-1"]


def test_stop_sequences_end_the_reply(rt: Runtime) -> None:
    body = {"model": "stub-1", "messages": MESSAGES, "max_tokens": 30}
    free = call(rt, "POST", "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    stop = free[4:6]
    cut = call(rt, "POST", "/v1/chat/completions", json={**body, "stop": stop}).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == free[: free.index(stop)]
    streamed = sse_events(call(rt, "POST", "/v1/chat/completions", json={**body, "stop": [stop], "stream": True}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed[:-1] if c["choices"])
    assert text == cut["message"]["content"], "text held back for a possible stop is streamed at the end"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": MESSAGES}, 404, "model"),
        ({"model": "stub-1", "messages": []}, 400, "messages"),
        ({"model": "stub-1", "messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": "stub-1", "messages": MESSAGES, "temperature": 9}, 400, "temperature"),
        ({"model": "stub-1", "messages": MESSAGES, "n": 65}, 400, "n"),
        ({"model": "stub-1", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ],
)
def test_bad_requests_get_openai_errors(rt: Runtime, body: dict[str, Any], status: int, param: str | None) -> None:
    resp = call(rt, "POST", "/v1/chat/completions", json=body)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    # and the server still serves
    ok = call(rt, "POST", "/v1/chat/completions", json={"model": "stub-1", "messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200


def test_malformed_json_oversized_bodies_and_auth(rt: Runtime) -> None:
    bad = call(rt, "POST", "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    big = call(
        rt,
        "POST",
        "/v1/chat/completions",
        ServerConfig(max_body_bytes=100),
        json={"model": "stub-1", "messages": MESSAGES * 10},
    )
    assert big.status_code == 413
    locked = ServerConfig(api_key="sesame")
    body = {"model": "stub-1", "messages": MESSAGES, "max_tokens": 2}
    assert call(rt, "POST", "/v1/chat/completions", locked, json=body).status_code == 401
    wrong = call(rt, "POST", "/v1/chat/completions", locked, json=body, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert (
        call(
            rt, "POST", "/v1/chat/completions", locked, json=body, headers={"authorization": "Bearer sesame"}
        ).status_code
        == 200
    )
    assert (
        call(rt, "POST", "/v1/chat/completions", locked, json=body, headers={"x-api-key": "sesame"}).status_code == 200
    )
    assert call(rt, "GET", "/health", locked).json() == {"status": "ok"}


def test_models_and_health(rt: Runtime) -> None:
    listing = call(rt, "GET", "/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["stub-1"]
    assert call(rt, "GET", "/v1/models/stub-1").json()["id"] == "stub-1"
    missing = call(rt, "GET", "/v1/models/other")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    ready = call(rt, "GET", "/health/ready")
    assert ready.status_code == 200
    assert ready.json()["models"] == {"stub-1": "running"}


def test_completions_json_and_stream(rt: Runtime) -> None:
    body = {"model": "stub-1", "prompt": "once upon a time", "max_tokens": 9}
    data = call(rt, "POST", "/v1/completions", json=body).json()
    expected = rt.complete("stub", "once upon a time", max_tokens=9).reply
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == expected
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 9
    events = sse_events(call(rt, "POST", "/v1/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert call(rt, "POST", "/v1/completions", json={**body, "prompt": ""}).status_code == 400


def test_embeddings(rt: Runtime) -> None:
    single = call(rt, "POST", "/v1/embeddings", json={"model": "stub-1", "input": "embed me"}).json()
    assert single["object"] == "list"
    vector = single["data"][0]["embedding"]
    assert vector == rt.embed("stub", "embed me")
    assert single["usage"]["prompt_tokens"] == len(rt.tokenize("stub", "embed me", parse_special=True))
    many = call(rt, "POST", "/v1/embeddings", json={"model": "stub-1", "input": ["a", "b"]}).json()
    assert [d["index"] for d in many["data"]] == [0, 1]
    packed = call(
        rt, "POST", "/v1/embeddings", json={"model": "stub-1", "input": "embed me", "encoding_format": "base64"}
    ).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert np.frombuffer(raw, dtype="<f4").tolist() == pytest.approx(vector)
    assert call(rt, "POST", "/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404


def test_max_tokens_beyond_the_context_is_lowered_or_refused_when_strict(rt: Runtime) -> None:
    # A local context is small next to what clients ask for (agents send 8k-32k): by default the reply may use
    # what the context leaves and ends with "length"; --strict-max-tokens refuses it as hosted APIs do.
    body = {"model": "stub-1", "messages": MESSAGES, "max_tokens": 10**6}
    lowered = call(rt, "POST", "/v1/chat/completions", json=body)
    assert lowered.status_code == 200, lowered.text
    usage = lowered.json()["usage"]
    n_ctx = int(rt.model_info("stub")["n_ctx_seq"])
    assert lowered.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= n_ctx
    strict = call(rt, "POST", "/v1/chat/completions", ServerConfig(strict_max_tokens=True), json=body)
    assert strict.status_code == 400
    assert strict.json()["error"]["code"] == "context_length_exceeded"
    streamed = call(
        rt, "POST", "/v1/chat/completions", ServerConfig(strict_max_tokens=True), json={**body, "stream": True}
    )
    assert streamed.status_code == 400  # refused before the stream starts, with the same envelope
    assert streamed.json() == strict.json()
