"""llama-server's own API over the stub: /completion (JSON and SSE, n_probs, timings, stop types), /tokenize with
pieces, /detokenize, /apply-template, /props, /slots, the OpenAI routes without /v1, and requests naming no model."""

from __future__ import annotations

import json
from typing import Any

from erllama import Runtime
from tests.unit.server.conftest import GREETING, request


def _sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: ")]


def test_completion_reports_llama_server_fields(srt: Runtime) -> None:
    body = {"model": "plain", "prompt": "user: say hi", "n_predict": 12, "n_probs": 2, "return_tokens": True}
    r = request(srt, "POST", "/completion", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["content"] == GREETING.encode()[:12].decode("utf-8", "ignore") or out["content"]
    assert out["stop"] is True
    assert out["stop_type"] in ("limit", "eos")
    assert out["timings"]["predicted_n"] == len(out["tokens"]) == out["tokens_predicted"]
    assert out["timings"]["prompt_n"] + out["timings"]["cache_n"] == out["tokens_evaluated"]
    assert len(out["completion_probabilities"]) == out["tokens_predicted"]
    assert all(len(p["top_logprobs"]) == 2 for p in out["completion_probabilities"])
    chunks = _sse(request(srt, "POST", "/completion", json={**body, "stream": True}).text)
    assert all(c["stop"] is False for c in chunks[:-1])
    assert chunks[-1]["stop"] is True
    assert "".join(c["content"] for c in chunks[:-1]) == out["content"]


def test_a_stop_word_is_reported(srt: Runtime) -> None:
    r = request(srt, "POST", "/completion", json={"model": "plain", "prompt": "user: hi", "stop": ["世界"]})
    out = r.json()
    assert out["stop_type"] == "word"
    assert out["stopping_word"] == "世界"
    assert out["content"] == GREETING[: GREETING.index("世界")]


def test_tokenize_detokenize_and_templates(srt: Runtime) -> None:
    toks = request(srt, "POST", "/tokenize", json={"model": "plain", "content": "héllo"}).json()["tokens"]
    assert toks == srt.tokenize("plain", "héllo", add_special=False, parse_special=True)
    pieces = request(srt, "POST", "/tokenize", json={"model": "plain", "content": "é", "with_pieces": True}).json()
    assert all(isinstance(p["piece"], (str, list)) for p in pieces["tokens"])  # a split character: its bytes
    text = request(srt, "POST", "/detokenize", json={"model": "plain", "tokens": toks}).json()["content"]
    assert text == "héllo"
    messages = [{"role": "user", "content": "hi"}]
    prompt = request(srt, "POST", "/apply-template", json={"model": "hermes", "messages": messages}).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n")


def test_props_slots_and_routes_without_v1(srt: Runtime) -> None:
    props = request(srt, "GET", "/props?model=plain").json()
    assert props["total_slots"] == 2
    assert props["default_generation_settings"]["n_ctx"] == srt.model_info("plain")["n_ctx_seq"]
    assert props["infill"] is False
    slots = request(srt, "GET", "/slots?model=plain").json()
    assert [s["id"] for s in slots] == [0, 1]
    assert request(srt, "POST", "/slots/0?action=save", json={}).status_code == 400
    chat = request(
        srt, "POST", "/chat/completions", json={"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.json()["choices"][0]["message"]["content"] == GREETING
    assert [m["id"] for m in request(srt, "GET", "/models").json()["data"]] == ["hermes", "plain"]
    infill = request(srt, "POST", "/infill", json={"model": "plain", "input_prefix": "a", "input_suffix": "b"})
    assert infill.status_code == 400
    assert "fill-in-the-middle" in infill.json()["error"]["message"]


def test_a_request_without_a_model_needs_a_default(srt: Runtime) -> None:
    from erllama.server import ServerConfig

    # two models and none pinned alone: there is no default, so the name is required
    r = request(srt, "POST", "/completion", json={"prompt": "user: hi", "n_predict": 2})
    assert r.status_code == 400
    assert "model name is required" in r.json()["error"]["message"]
    unknown = request(srt, "POST", "/v1/chat/completions", ServerConfig(model_fallback="any"),
                      json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert unknown.status_code == 404  # still no default to fall back on


def test_the_only_model_answers_requests_that_name_none(srt: Runtime) -> None:
    import asyncio

    import httpx

    from erllama.server import ServerConfig, create_app

    async def go(config: ServerConfig) -> list[int]:
        app = create_app(srt, {"plain": "plain"}, config)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            missing = await c.post("/completion", json={"prompt": "user: hi", "n_predict": 2})
            msgs = [{"role": "user", "content": "hi"}]
            unknown = await c.post("/chat/completions", json={"model": "gpt-4o", "messages": msgs, "max_tokens": 2})
            return [missing.status_code, unknown.status_code]

    assert asyncio.run(go(ServerConfig())) == [200, 404]  # default: a missing name only
    assert asyncio.run(go(ServerConfig(model_fallback="any"))) == [200, 200]
    assert asyncio.run(go(ServerConfig(model_fallback="none"))) == [400, 404]


def test_more_replies_than_slots_are_refused_not_deadlocked(srt: Runtime) -> None:
    # every reply of a request runs at once, each in a slot: a request asking for more than the model has would
    # wait for slots only its own replies free (it hung until the queue timeout)
    three = ["user: a", "user: b", "user: c"]  # the stub models have 2 sequences
    r = request(srt, "POST", "/v1/completions", json={"model": "plain", "prompt": three, "max_tokens": 2})
    assert r.status_code == 400
    assert "runs 2 at once" in r.json()["error"]["message"]
    r = request(srt, "POST", "/completion", json={"model": "plain", "prompt": three, "n_predict": 2})
    assert r.status_code == 400
    two = request(srt, "POST", "/v1/completions", json={"model": "plain", "prompt": three[:2], "max_tokens": 2})
    assert [c["index"] for c in two.json()["choices"]] == [0, 1]


def test_logit_bias_takes_ids_texts_and_bans(srt: Runtime) -> None:
    base = {"model": "plain", "prompt": "user: long", "n_predict": 6, "temperature": 0.0}  # unscripted: logits
    free = request(srt, "POST", "/completion", json=base).json()["content"]
    first = srt.tokenize("plain", free, add_special=False)[0]
    for bias in ([[first, False]], {str(first): -100}, [[free[:1], False]]):
        out = request(srt, "POST", "/completion", json={**base, "logit_bias": bias})
        assert out.status_code == 200, out.text
        assert out.json()["content"] != free, bias
    bad_biases: list[Any] = [[[" i ", "x"]], [[1, [2]]], {"a": None}, [[]], [[1, 2, 3]], [[True, 1]]]
    for bad in bad_biases:
        assert request(srt, "POST", "/completion", json={**base, "logit_bias": bad}).status_code == 400, bad


def test_null_model_names_and_embeddings_over_the_context(srt: Runtime) -> None:
    import asyncio

    import httpx

    from erllama.server import create_app

    n_ctx = int(srt.model_info("plain")["n_ctx_seq"])

    async def go() -> list[httpx.Response]:
        app = create_app(srt, {"plain": "plain"})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            msgs = [{"role": "user", "content": "hi"}]
            chat = await c.post("/chat/completions", json={"model": None, "messages": msgs, "max_tokens": 2})
            long = await c.post("/v1/embeddings", json={"model": None, "input": "x" * (n_ctx + 10)})
            return [chat, long]

    chat, long = asyncio.run(go())
    assert chat.status_code == 200, chat.text  # llama-server's clients send "model": null
    assert chat.json()["model"] == "plain"
    assert long.status_code == 400
    assert "too large" in long.json()["error"]["message"]


def test_a_prompt_over_the_context_is_llama_servers_error_on_its_routes(srt: Runtime) -> None:
    n_ctx = int(srt.model_info("plain")["n_ctx_seq"])
    text = "y" * (n_ctx + 50)  # the stub: a token per byte
    native = request(srt, "POST", "/completion", json={"model": "plain", "prompt": text})
    msgs = [{"role": "user", "content": text}]
    bare = request(srt, "POST", "/chat/completions", json={"model": "plain", "messages": msgs, "stream": True})
    v1 = request(srt, "POST", "/v1/chat/completions", json={"model": "plain", "messages": msgs})
    for r in (native, bare):
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "exceed_context_size_error"
        assert r.json()["error"]["n_prompt_tokens"] > n_ctx
        assert r.json()["error"]["n_ctx"] == n_ctx
    assert v1.json()["error"]["type"] == "invalid_request_error"  # OpenAI's own words on /v1
    assert v1.json()["error"]["code"] == "context_length_exceeded"


def test_a_model_name_that_is_not_unicode_is_a_400(srt: Runtime) -> None:
    # a lone surrogate: the unknown-model error that named it could not even be encoded (a 500, found by the fuzz)
    body = '{"model": "\\ud800", "input": "hello"}'
    r = request(srt, "POST", "/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid Unicode" in r.json()["error"]["message"]
