"""The three dialects over scripted stubs: tool round trips, structured output, queue limits, keep-alive, metrics,
stateless multi-turn cache hits and bad input in each dialect's envelope."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from erllama import Runtime
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.cache.report import parse_header
from erllama.chat import ChatEngine, Message, Tool
from erllama.model import StubBackend
from erllama.server import ServerConfig, create_app
from erllama.server.models import ModelDirectory
from tests.unit.server.conftest import GREETING, request, script

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("model", ["hermes", "plain"])
def test_openai_tool_round_trip(srt: Runtime, model: str) -> None:
    turn1 = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = request(srt, "POST", "/v1/chat/completions", json={"model": model, "messages": turn1, "tools": [TOOL]})
    msg = first.json()["choices"][0]["message"]
    assert first.json()["choices"][0]["finish_reason"] == "tool_calls"
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    turn2 = [
        *turn1,
        msg,
        {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    second = request(srt, "POST", "/v1/chat/completions", json={"model": model, "messages": turn2, "tools": [TOOL]})
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["message"]["content"] == "It is sunny in Paris."
    assert second.json()["choices"][0]["finish_reason"] == "stop"


def test_tool_results_and_calls_are_rendered(srt: Runtime) -> None:
    from erllama.chat import ToolCall

    engine = ChatEngine(srt)
    tool = Tool("get_weather", "Weather", {"type": "object"})
    msgs = [
        Message("user", "weather?"),
        Message("assistant", "", (ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
        Message("tool", "sunny", tool_call_id="c1", name="get_weather"),
    ]
    native = engine.prepare("hermes", msgs, tools=[tool])
    assert native.template == "jinja"
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in native.prompt
    assert "<tools>" in native.prompt
    assert "<|im_start|>tool\nsunny" in native.prompt
    generic = engine.prepare("plain", msgs, tools=[tool])
    assert generic.template == "builtin"
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in generic.prompt
    assert "Result of the tool get_weather:\nsunny" in generic.prompt
    assert "You can call these tools" in generic.prompt
    assert native.grammar is None
    assert generic.grammar is None


def test_forced_tool_choice_and_schemas_become_grammars(srt: Runtime) -> None:
    engine = ChatEngine(srt)
    tool = Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}})
    msgs = [Message("user", "hi")]
    hermes = engine.prepare("hermes", msgs, tools=[tool], tool_choice="get_weather")
    assert hermes.grammar is not None
    assert hermes.grammar.startswith('root ::= "<tool_call>\\n" tool-call-json')
    assert '"\\"get_weather\\""' in hermes.grammar
    plain = engine.prepare("plain", msgs, tools=[tool], tool_choice="required")
    assert plain.grammar is not None
    assert "tool-calls" in plain.grammar
    schema = engine.prepare("plain", msgs, response_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
    assert schema.grammar is not None
    assert "integer" in schema.grammar
    with pytest.raises(ValueError, match="not one of the request's tools"):
        engine.prepare("plain", msgs, tools=[tool], tool_choice="nope")


def test_response_format_json_schema(srt: Runtime) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    body = {
        "model": "plain",
        "messages": [{"role": "user", "content": "Give me JSON about Ada"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    }
    resp = request(srt, "POST", "/v1/chat/completions", json=body)
    assert json.loads(resp.json()["choices"][0]["message"]["content"]) == {"name": "Ada", "age": 36}
    bad = {**body, "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}}
    resp = request(srt, "POST", "/v1/chat/completions", json=bad)
    assert resp.status_code == 400
    assert "unsupported JSON schema" in resp.json()["error"]["message"]
    resp = request(srt, "POST", "/api/chat", json={**body, "format": {"$ref": "#/x"}, "stream": False})
    assert resp.status_code == 400
    assert "error" in resp.json()


@pytest.mark.parametrize(
    ("dialect", "path", "body", "kind"),
    [
        ("openai", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi"}]}, "openai"),
        (
            "anthropic",
            "/v1/messages",
            {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 64},
            "anthropic",
        ),
        ("ollama", "/api/chat", {"messages": [{"role": "user", "content": "Say hi"}], "stream": False}, "ollama"),
    ],
)
def test_stateless_multi_turn_hits_the_cache(
    srt: Runtime, dialect: str, path: str, body: dict[str, Any], kind: str
) -> None:
    """Each turn resends the whole conversation; from turn 2 the earlier turns come from the cache."""
    messages = list(body["messages"])
    cached = []
    for turn in range(3):
        resp = request(srt, "POST", path, json={**body, "model": "hermes", "messages": messages})
        assert resp.status_code == 200, resp.text
        data = resp.json()
        if kind == "openai":
            reply = data["choices"][0]["message"]["content"]
            cached.append(data["usage"]["prompt_tokens_details"]["cached_tokens"])
        elif kind == "anthropic":
            reply = data["content"][0]["text"]
            cached.append(data["usage"]["cache_read_input_tokens"])
        else:
            reply = data["message"]["content"]
            hit = srt.last_cache_hit("hermes")
            assert hit is not None
            prompt = ChatEngine(srt).prepare("hermes", [Message(m["role"], m["content"]) for m in messages]).prompt
            n_prompt = len(srt.tokenize("hermes", prompt, parse_special=True))
            assert data["prompt_eval_count"] == n_prompt  # the whole prompt, as Ollama counts since ollama#16428
            assert data["prompt_eval_cached_count"] == data["cache"]["cached_tokens"] == hit["prefix_len"]
            cached.append(hit["prefix_len"])
        header = parse_header(resp.headers["x-erllama-cache"])  # every dialect: how the cache served the prompt
        assert int(header["restored"]) == cached[-1]
        assert header["kind"] == ("cold" if turn == 0 else "partial")
        assert reply == GREETING
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Say hi again ({turn})"}]
    assert cached[0] == 0
    assert all(c > 40 for c in cached[1:]), cached
    assert cached[2] > cached[1]


def test_bad_input_in_each_envelope(srt: Runtime) -> None:
    cfg = ServerConfig(api_key="sekrit", max_body_bytes=4096)
    auth = {"authorization": "Bearer sekrit"}

    def openai_or_anthropic(r: httpx.Response) -> Any:
        return r.json()["error"]["type"]

    def ollama(r: httpx.Response) -> Any:
        return r.json()["error"]

    cases = [
        ("/v1/chat/completions", openai_or_anthropic),
        ("/v1/messages", openai_or_anthropic),
        ("/api/chat", ollama),
    ]
    for path, envelope in cases:
        for body, status in [
            (b"{not json", 400),
            (json.dumps({"model": "hermes", "messages": "nope", "max_tokens": 5}).encode(), 400),
            (
                json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}).encode(),
                404,
            ),
            (b'{"model": "hermes", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}', 413),
        ]:
            resp = request(srt, "POST", path, cfg, content=body, headers={**auth, "content-type": "application/json"})
            assert resp.status_code == status, (path, body[:40], resp.text)
            assert envelope(resp)
        resp = request(srt, "POST", path, cfg, json={"model": "hermes"}, headers={"x-api-key": "wrong"})
        assert resp.status_code == 401
        assert envelope(resp)
    anthropic = request(
        srt, "POST", "/v1/messages", json={"model": "hermes", "messages": [{"role": "user", "content": "x"}]}
    )
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "invalid_request_error"


def test_prompt_over_context_is_a_4xx(srt: Runtime) -> None:
    big = "word " * 5000  # the stub's sequences hold 4096 tokens
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {}),
        ("/v1/messages", {"max_tokens": 5}),
        ("/api/chat", {"stream": False}),
    ]
    for path, extra in cases:
        resp = request(
            srt, "POST", path, json={"model": "hermes", "messages": [{"role": "user", "content": big}], **extra}
        )
        assert resp.status_code == 400, (path, resp.text)


def test_anthropic_count_tokens_and_tool_blocks(srt: Runtime) -> None:
    body = {"model": "hermes", "messages": [{"role": "user", "content": "Say hello"}]}
    resp = request(srt, "POST", "/v1/messages/count_tokens", json=body)
    prompt = ChatEngine(srt).prepare("hermes", [Message("user", "Say hello")]).prompt
    assert resp.json() == {"input_tokens": len(srt.tokenize("hermes", prompt, parse_special=True))}
    tools = [{"name": "get_weather", "description": "w", "input_schema": TOOL["function"]["parameters"]}]  # type: ignore[index]
    first = request(
        srt,
        "POST",
        "/v1/messages",
        json={
            "model": "hermes",
            "max_tokens": 128,
            "tools": tools,
            "messages": [{"role": "user", "content": "weather in Paris?"}],
        },
    ).json()
    assert first["stop_reason"] == "tool_use"
    (use,) = [b for b in first["content"] if b["type"] == "tool_use"]
    assert use["input"] == {"city": "Paris"}
    follow = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "sunny"}]},
    ]
    second = request(
        srt, "POST", "/v1/messages", json={"model": "hermes", "max_tokens": 64, "tools": tools, "messages": follow}
    )
    assert second.json()["content"] == [{"type": "text", "text": "It is sunny in Paris."}]


def _concurrent(app: Any, calls: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", timeout=30
        ) as c:
            first = asyncio.create_task(c.post(calls[0][0], json=calls[0][1]))
            await asyncio.sleep(0.2)  # the first one holds the only slot
            rest = await asyncio.gather(*(c.post(p, json=b) for p, b in calls[1:]))
            return [await first, *rest]

    return asyncio.run(go())


def test_busy_model_is_refused_in_each_dialect() -> None:
    rt = Runtime()
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1, eos_bias=-50.0, step_delay_s=0.01), model_id="slow")
    try:
        app = create_app(rt, {"slow": "slow"}, ServerConfig(max_concurrency=1, max_queue=0))
        msg = [{"role": "user", "content": "long"}]
        out = _concurrent(
            app,
            [
                ("/v1/chat/completions", {"model": "slow", "messages": msg, "max_tokens": 60}),
                ("/v1/chat/completions", {"model": "slow", "messages": msg, "max_tokens": 5}),
                ("/v1/messages", {"model": "slow", "messages": msg, "max_tokens": 5}),
                ("/api/chat", {"model": "slow", "messages": msg, "stream": False}),
            ],
        )
        assert out[0].status_code == 200
        assert [r.status_code for r in out[1:]] == [429, 529, 503]
        assert all(r.headers["retry-after"] == "1" for r in out[1:])
        assert out[2].json()["error"]["type"] == "overloaded_error"
        app2 = create_app(rt, {"slow": "slow"}, ServerConfig(max_concurrency=1, max_queue=4, queue_timeout_s=0.1))
        out = _concurrent(
            app2,
            [
                ("/v1/chat/completions", {"model": "slow", "messages": msg, "max_tokens": 60}),
                ("/v1/chat/completions", {"model": "slow", "messages": msg, "max_tokens": 5}),
            ],
        )
        assert [r.status_code for r in out] == [200, 429]
        assert "no slot within" in out[1].json()["error"]["message"]
        scrape = asyncio.run(_get(app2, "/metrics"))
        assert 'erllama_rejected_total{reason="queue_timeout"} 1.0' in scrape
    finally:
        rt.close()


async def _get(app: Any, path: str) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        return (await c.get(path)).text


def test_metrics_exposition(srt: Runtime) -> None:
    app = create_app(srt, {"hermes": "hermes"})

    async def go() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            body = {"model": "hermes", "messages": [{"role": "user", "content": "Say hi"}]}
            for _ in range(2):
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
            return (await c.get("/metrics")).text

    text = asyncio.run(go())
    assert 'erllama_requests_total{dialect="openai",endpoint="/v1/chat/completions",status="200"} 2.0' in text
    assert 'erllama_generations_total{model="hermes",reason="stop"} 2.0' in text
    assert 'erllama_ttft_seconds_count{model="hermes"} 2.0' in text
    assert 'erllama_tokens_total{kind="cached",model="hermes"}' in text
    assert "erllama_cache_hits_exact 1.0" in text or "erllama_cache_hits_longest_prefix 1.0" in text
    assert 'erllama_cache_tier_rows{tier="ram"}' in text
    assert 'erllama_cache_tier_bytes{tier="ram"}' in text
    assert 'erllama_queue_waiting{model="hermes"} 0.0' in text
    assert "erllama_models_loaded 1.0" in text
    # vLLM's names, which gateways read: the same queues, and the prefix cache in prompt tokens
    assert 'vllm:num_requests_waiting{model_name="hermes"} 0.0' in text
    assert 'vllm:num_requests_running{model_name="hermes"} 0.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="hermes"} 0.0' in text, "idle: no cells held"

    def value(series: str) -> float:
        return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(series + " ")))

    prompt = value('erllama_tokens_total{kind="prompt",model="hermes"}')
    cached = value('erllama_tokens_total{kind="cached",model="hermes"}')
    assert value('vllm:prefix_cache_queries_total{model_name="hermes"}') == prompt > 0
    assert value('vllm:prefix_cache_hits_total{model_name="hermes"}') == cached > 0, "the second request hit"


def test_owned_by_is_configurable(srt: Runtime) -> None:
    app = create_app(srt, {"hermes": "hermes"}, ServerConfig(owned_by="acme-gateway"))
    cards = json.loads(asyncio.run(_get(app, "/v1/models")))["data"]
    assert [c["owned_by"] for c in cards] == ["acme-gateway"]
    assert (
        json.loads(asyncio.run(_get(create_app(srt, {"hermes": "hermes"}), "/v1/models")))["data"][0]["owned_by"]
        == "erllama"
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Runtime, ModelDirectory]]:
    rt = Runtime(CacheStore([RamTier(1 << 24)]), policy=SavePolicy(min_tokens=8))
    for name in ("alpha", "beta:7b"):
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF-stub")

    def load(runtime: Runtime, path: Path, name: str) -> str:
        return runtime.load_model(
            backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0, script=script), model_id=name
        )

    yield rt, ModelDirectory(tmp_path, load)
    rt.close()


def test_ollama_models_load_on_demand_and_unload(store: tuple[Runtime, ModelDirectory]) -> None:
    rt, source = store
    app = create_app(rt, {}, ServerConfig(keep_alive_s=300), source=source)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            tags = (await c.get("/api/tags")).json()["models"]
            assert [m["name"] for m in tags] == ["alpha", "beta:7b"]
            assert tags[0]["digest"] == hashlib.sha256(b"GGUF-stub").hexdigest()
            assert (await c.get("/api/ps")).json() == {"models": []}
            loaded = (await c.post("/api/generate", json={"model": "alpha", "prompt": ""})).json()
            assert loaded["done"]
            assert loaded["done_reason"] == "load"
            assert [m["name"] for m in (await c.get("/api/ps")).json()["models"]] == ["alpha"]
            chat = await c.post("/api/chat", json={"model": "beta:7b", "messages": [{"role": "user", "content": "hi"}]})
            lines = [json.loads(x) for x in chat.text.splitlines()]
            assert "".join(x["message"]["content"] for x in lines) == GREETING
            assert lines[-1]["done"]
            assert sorted(rt.models()) == ["alpha", "beta:7b"]
            gone = (await c.post("/api/generate", json={"model": "alpha", "prompt": "", "keep_alive": 0})).json()
            assert gone["done_reason"] == "unload"
            assert rt.models() == ["beta:7b"]
            # keep_alive as a duration: 50ms, then the reaper's pass unloads it once idle
            await c.post("/api/chat", json={"model": "beta:7b", "messages": [], "keep_alive": "50ms"})
            await asyncio.sleep(0.1)
            assert await app.state.erllama.reap() == ["beta:7b"]
            assert rt.models() == []
            assert (await c.post("/api/copy", json={"source": "alpha", "destination": "alpha:copy"})).status_code == 200
            assert "alpha:copy" in [m["name"] for m in (await c.get("/api/tags")).json()["models"]]
            d = await c.request("DELETE", "/api/delete", json={"model": "alpha:copy"})
            assert d.status_code == 200
            d = await c.request("DELETE", "/api/delete", json={"model": "alpha:copy"})
            assert d.status_code == 404
            assert "error" in d.json()
            bad = await c.post("/api/copy", json={"source": "alpha", "destination": "../evil"})
            assert bad.status_code == 400
            pull = await c.post("/api/pull", json={"model": "not-in-catalog"})
            assert pull.status_code == 404
            show = (await c.post("/api/show", json={"model": "alpha"})).json()
            assert {"modelfile", "template", "details", "model_info", "capabilities"} <= set(show)
            assert (await c.get("/api/version")).json()["version"]
            assert (await c.get("/")).text == "Ollama is running"

    asyncio.run(go())


def test_keep_alive_durations() -> None:
    from erllama.server.ollama import keep_alive_s

    assert keep_alive_s("5m") == 300.0
    assert keep_alive_s("1h30m") == 5400.0
    assert keep_alive_s("250ms") == 0.25
    assert keep_alive_s(10) == 10.0
    assert keep_alive_s(-1) is None
    assert keep_alive_s("-1") is None
    assert keep_alive_s(None) == "default"
    with pytest.raises(ValueError, match="keep_alive"):
        keep_alive_s("soon")


def test_openai_logprobs_chat_and_completion() -> None:
    rt = Runtime()
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1, eos_bias=-50.0), model_id="hash")  # unscripted
    app = create_app(rt, {"hash": "hash"})

    def post(path: str, json: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                return await c.post(path, json=json)

        return asyncio.run(go())

    try:
        body: dict[str, Any] = {
            "model": "hash",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 12,
            "logprobs": True,
            "top_logprobs": 3,
        }
        data = post("/v1/chat/completions", json=body).json()
        content = data["choices"][0]["logprobs"]["content"]
        assert len(content) == data["usage"]["completion_tokens"] == 12
        assert "".join(c["token"] for c in content) == data["choices"][0]["message"]["content"]
        for c in content:
            # greedy: the chosen token is the most likely one, and its logprob is the top alternative's
            assert c["top_logprobs"][0]["token"] == c["token"]
            assert c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"])
            assert [t["logprob"] for t in c["top_logprobs"]] == sorted(
                (t["logprob"] for t in c["top_logprobs"]), reverse=True
            )
            assert sum(math.exp(t["logprob"]) for t in c["top_logprobs"]) <= 1.0 + 1e-9
            assert c["bytes"] == list(c["token"].encode())
        chunks = [
            json.loads(b[6:])
            for b in post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
            if b.startswith("data: {")
        ]
        streamed = [e for ch in chunks for e in ((ch["choices"][0].get("logprobs") or {}).get("content") or [])]
        assert [(e["token"], round(e["logprob"], 6)) for e in streamed] == [
            (c["token"], round(c["logprob"], 6)) for c in content
        ]
        plain = post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}).json()
        assert plain["choices"][0]["logprobs"] is None
        bad = post("/v1/chat/completions", json={**body, "logprobs": False})
        assert bad.status_code == 400
        text = post("/v1/completions", json={"model": "hash", "prompt": "abc", "max_tokens": 5, "logprobs": 2}).json()
        legacy = text["choices"][0]["logprobs"]
        assert "".join(legacy["tokens"]) == text["choices"][0]["text"]
        assert len(legacy["token_logprobs"]) == 5
        assert legacy["text_offset"] == [sum(len(t) for t in legacy["tokens"][:i]) for i in range(5)]
        assert all(len(d) == 2 for d in legacy["top_logprobs"])
    finally:
        rt.close()


def test_token_logprob_matches_a_direct_log_softmax() -> None:
    from erllama.model.backend import token_logprob

    logits = np.array([2.0, -1.0, 0.5, -np.inf, 3.0], dtype=np.float32)
    lp = token_logprob(logits, 2, 2, lambda t: bytes([97 + t]))
    finite = logits[np.isfinite(logits)].astype(np.float64)
    lse = np.log(np.exp(finite).sum())
    assert lp.logprob == pytest.approx(0.5 - lse)
    assert lp.piece == b"c"
    assert [(t, p) for t, p, _ in lp.top] == [(4, b"e"), (0, b"a")]
    assert lp.top[0][2] == pytest.approx(3.0 - lse)


def test_anthropic_pings_while_the_prompt_is_prefilled() -> None:
    from erllama.server import ServerConfig

    rt = Runtime()
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1, eos_bias=-50.0, step_delay_s=0.001), model_id="slow")
    try:
        app = create_app(rt, {"slow": "slow"}, ServerConfig(ping_period_s=0.05))
        body = {"model": "slow", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "w " * 300}]}

        async def go() -> str:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", timeout=30
            ) as c:
                return (await c.post("/v1/messages", json=body)).text

        events = [b.split("\n", 1)[0] for b in asyncio.run(go()).split("\n\n") if b]
        assert events[0] == "event: message_start"
        assert events.count("event: ping") >= 3  # one at the start, more while ~600 tokens are prefilled
        assert events[-2:] == ["event: message_delta", "event: message_stop"]
    finally:
        rt.close()


def test_ollama_generate_continues_a_context(srt: Runtime) -> None:
    first = request(
        srt, "POST", "/api/generate", json={"model": "hermes", "prompt": "Say hello", "stream": False}
    ).json()
    assert first["response"] == GREETING
    context = first["context"]
    second = request(
        srt,
        "POST",
        "/api/generate",
        json={"model": "hermes", "prompt": "Say hello", "stream": False, "context": context},
    ).json()
    hit = srt.last_cache_hit("hermes")
    assert hit is not None
    assert hit["prefix_len"] >= len(context) - 1  # the whole earlier exchange came from the cache
    assert second["prompt_eval_count"] - second["prompt_eval_cached_count"] < len(context)  # only the new turn
    assert second["context"][: len(context)] == context
    bad = request(
        srt, "POST", "/api/generate", json={"model": "hermes", "prompt": "x", "stream": False, "context": [10**9]}
    )
    assert bad.status_code == 400


def test_cors_is_off_unless_configured_and_messages_are_bounded(srt: Runtime) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    off = request(srt, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    cfg = ServerConfig(cors_origins=("https://app.example",), max_messages=2)
    on = request(srt, "OPTIONS", "/v1/chat/completions", cfg, headers=preflight)
    assert on.headers["access-control-allow-origin"] == "https://app.example"
    other = request(
        srt, "OPTIONS", "/v1/chat/completions", cfg, headers={**preflight, "origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
    three = [{"role": "user", "content": "a"}] * 3
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {}),
        ("/v1/messages", {"max_tokens": 4}),
        ("/api/chat", {"stream": False}),
    ]
    for path, extra in cases:
        resp = request(srt, "POST", path, cfg, json={"model": "hermes", "messages": three, **extra})
        assert resp.status_code == 400, (path, resp.text)
        assert "more than 2 messages" in resp.text
