"""llama-server's own API over the stub: /completion (JSON and SSE, n_probs, timings, stop types), /tokenize with
pieces, /detokenize, /apply-template, /props, /slots, the OpenAI routes without /v1, and requests naming no model."""

from __future__ import annotations

import json
from typing import Any

from erllama import Runtime
from tests.unit.server.conftest import GREETING, request


def _sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: ") and b != "data: [DONE]"]


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


def test_the_daemons_seed_makes_unseeded_requests_repeatable(srt: Runtime) -> None:
    from erllama.server import ServerConfig

    seeded = ServerConfig(default_seed=7)
    body = {"model": "plain", "prompt": "user: a long story", "n_predict": 16, "temperature": 1.5}
    first = request(srt, "POST", "/completion", seeded, json=body).json()
    streamed = _sse(request(srt, "POST", "/completion", seeded, json={**body, "stream": True}).text)
    assert "".join(c["content"] for c in streamed[:-1]) == first["content"]
    assert first["generation_settings"]["seed"] == streamed[-1]["generation_settings"]["seed"] == 7
    # the same as asking for seed 7 explicitly; another seed samples another reply
    explicit = request(srt, "POST", "/completion", json={**body, "seed": 7}).json()
    assert explicit["content"] == first["content"]
    other = request(srt, "POST", "/completion", seeded, json={**body, "seed": 8}).json()
    assert other["content"] != first["content"]
    assert (
        request(srt, "GET", "/props?model=plain", seeded).json()["default_generation_settings"]["params"]["seed"] == 7
    )
    assert request(srt, "GET", "/props?model=plain").json()["default_generation_settings"]["params"]["seed"] == -1


def test_prompts_mix_token_ids_texts_and_json_objects(srt: Runtime) -> None:
    text = "user: say hi"
    ids = srt.tokenize("plain", text, parse_special=True)
    tail = srt.tokenize("plain", " again", add_special=False, parse_special=True)

    def run(prompt: Any) -> Any:
        r = request(srt, "POST", "/completion", json={"model": "plain", "prompt": prompt, "n_predict": 4})
        assert r.status_code == 200, r.text
        return r.json()

    one = run([*ids, " again"])  # one prompt: ids, then a text tokenized where it stands (no BOS in the middle)
    assert one["tokens_evaluated"] == len(ids) + len(tail)
    batch = run([ids, {"prompt_string": text}])  # two prompts: ids and a JSON prompt object
    assert [b["content"] for b in batch] == [run(text)["content"]] * 2
    assert [b["tokens_evaluated"] for b in batch] == [len(ids)] * 2
    assert run({"prompt_string": text})["content"] == batch[0]["content"]
    bad = [{"prompt_string": text, "multimodal_data": ["aGk="]}, {"text": text}, [ids, 5], [[1.5]]]
    for prompt in bad:
        r = request(srt, "POST", "/completion", json={"model": "plain", "prompt": prompt})
        assert r.status_code in (400, 422), (prompt, r.text)
        assert "error" in r.json() or "detail" in r.json()
    # embeddings take the same mixed arrays (llama-server's leniency on the OpenAI route)
    mixed = request(srt, "POST", "/v1/embeddings", json={"model": "plain", "input": [[*ids, " again"], text]}).json()
    assert mixed["data"][0]["embedding"] == srt.embed("plain", [*ids, *tail])
    assert mixed["data"][1]["embedding"] == srt.embed("plain", text)
    assert mixed["usage"]["prompt_tokens"] == len(ids) * 2 + len(tail)


def test_response_fields_and_the_logit_bias_ignore_eos_applies(srt: Runtime) -> None:
    body = {"model": "plain", "prompt": "user: say hi", "n_predict": 4}
    picked = request(srt, "POST", "/completion", json={**body, "response_fields": ["content", "timings/predicted_n"]})
    assert set(picked.json()) == {"content", "timings/predicted_n"}
    assert picked.json()["timings/predicted_n"] == 4
    eog = srt.model_info("plain")["eog_tokens"]
    ignoring = request(srt, "POST", "/completion", json={**body, "ignore_eos": True}).json()
    assert ignoring["generation_settings"]["logit_bias"] == [{"token": t, "bias": None} for t in eog]
    biased = request(srt, "POST", "/completion", json={**body, "logit_bias": [[5, 1.5]]}).json()
    assert biased["generation_settings"]["logit_bias"] == [{"token": 5, "bias": 1.5}]
    assert request(srt, "POST", "/completion", json=body).json()["generation_settings"]["logit_bias"] == []


def test_llama_server_chat_extensions(srt: Runtime) -> None:
    chat = {"model": "plain", "messages": [{"role": "system", "content": "Book"}, {"role": "user", "content": "hi"}]}
    counted = request(srt, "POST", "/chat/completions/input_tokens", json=chat)
    assert counted.status_code == 200, counted.text
    reply = request(srt, "POST", "/chat/completions", json={**chat, "verbose": True}).json()
    assert "Book" in reply["__verbose"]["prompt"]
    assert counted.json()["input_tokens"] == reply["usage"]["prompt_tokens"]
    assert "__verbose" not in request(srt, "POST", "/chat/completions", json=chat).json()
    # timings_per_token: llama-server's timings ride on the stream's last chunks, not on the first
    stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _sse(request(srt, "POST", "/v1/chat/completions", json={**stream, "timings_per_token": True}).text)
    assert "timings" not in chunks[0]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["timings"]["predicted_n"] == chunks[-1]["usage"]["completion_tokens"]
    plain = _sse(request(srt, "POST", "/v1/chat/completions", json=stream).text)
    assert not any("timings" in c for c in plain)
    # a reply continues the final assistant message: two assistant messages at the end are refused, as there
    twice = [*chat["messages"], {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    r = request(srt, "POST", "/chat/completions", json={"model": "plain", "messages": twice})
    assert r.status_code == 400
    assert "assistant" in r.json()["error"]["message"]


def test_json_object_with_a_schema(srt: Runtime) -> None:
    def ask(fmt: Any) -> Any:
        msgs = [{"role": "user", "content": "JSON please"}]
        return request(
            srt, "POST", "/v1/chat/completions", json={"model": "plain", "messages": msgs, "response_format": fmt}
        )

    assert ask({"type": "json_object", "schema": {"type": "object"}}).status_code == 200
    for schema in (123, {"type": "hiccup"}, {"type": 123}):
        r = ask({"type": "json_object", "schema": schema})
        assert r.status_code == 400, (schema, r.text)
