"""The daemon on a real socket with SmolLM2, driven by the official ``openai``, ``anthropic`` and ``ollama`` clients:
chat and completion, streaming and not, embeddings, model listing, tool-call round trips, JSON-schema output,
emoji / CJK streamed intact, and stateless multi-turn conversations that hit the cache from turn 2."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.model import LlamaBackend
from erllama.server import ServerConfig, create_app
from erllama.server.models import ModelDirectory
from erllama.testing import serve_app

pytestmark = [pytest.mark.native, pytest.mark.smollm2]

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
GREETING = "你好，世界 🎉 Grüße"
# a grammar that can only produce GREETING: every multi-byte character has to survive token-by-token streaming
GREETING_SCHEMA = {"type": "object", "properties": {"greeting": {"const": GREETING}}, "required": ["greeting"]}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def server(smollm2_path: Path, native: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runtime, str]]:
    rt = Runtime(CacheStore([RamTier(1 << 30)]), policy=SavePolicy(min_tokens=8))
    cfg = ContextConfig(n_ctx=2 * 2048, n_batch=256, n_seq_max=2)

    def load(runtime: Runtime, path: Path, name: str) -> str:
        return runtime.load_model(backend=lambda: LlamaBackend(path, context_config=cfg), model_id=name)

    models = tmp_path_factory.mktemp("models")
    os.symlink(smollm2_path, models / "smollm2:135m.gguf")
    source = ModelDirectory(models, load)
    app = create_app(rt, {"smollm2": load(rt, smollm2_path, "smollm2")}, ServerConfig(), source=source)
    try:
        with serve_app(app) as base:
            yield rt, base
    finally:
        rt.close()
        assert rt.cache is not None
        rt.cache.close()


def test_openai_client(server: tuple[Runtime, str]) -> None:
    _, base = server
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
        messages: Any = [{"role": "user", "content": "Repeat exactly: 你好，世界 🎉"}]
        whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24)
        chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert whole.choices[0].message.content == streamed
        assert "\ufffd" not in streamed  # multi-byte characters are never split across chunks
        forced: Any = {"type": "json_schema", "json_schema": {"name": "greeting", "schema": GREETING_SCHEMA}}
        parts = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=48, stream=True, response_format=forced
            )
            if c.choices
        ]
        assert json.loads("".join(parts)) == {"greeting": GREETING}
        assert all("\ufffd" not in p for p in parts)
        text = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8)
        text_streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="smollm2", prompt="The capital of France is", max_tokens=8, stream=True
            )
        )
        assert text.choices[0].text == text_streamed
        emb = client.embeddings.create(model="smollm2", input=["hello", "世界"])
        assert len(emb.data) == 2
        assert len(emb.data[0].embedding) == 576
        assert sorted(m.id for m in client.models.list()) == ["smollm2", "smollm2:135m"]


def test_openai_tool_round_trip_and_json_schema(server: tuple[Runtime, str]) -> None:
    _, base = server
    tools: Any = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER_SCHEMA},
        }
    ]
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
        messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = client.chat.completions.create(
            model="smollm2", messages=messages, tools=tools, tool_choice="required", max_tokens=64
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert isinstance(json.loads(call.function.arguments)["city"], str)  # type: ignore[union-attr]
        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
        ]
        # the result goes back with the call; tool_choice none asks for the answer in words (a 135M model would
        # otherwise happily call again)
        second = client.chat.completions.create(
            model="smollm2", messages=messages, tools=tools, tool_choice="none", max_tokens=32
        )
        assert second.choices[0].finish_reason in ("stop", "length")
        assert second.choices[0].message.content
        person_format: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
        structured = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Describe Ada Lovelace as JSON with her name and age."}],
            response_format=person_format,
            max_tokens=64,
        )
        person = json.loads(structured.choices[0].message.content or "")
        assert isinstance(person["name"], str)
        assert isinstance(person["age"], int)


def test_anthropic_client(server: tuple[Runtime, str]) -> None:
    _, base = server
    with anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0) as client:
        messages: Any = [{"role": "user", "content": "Say hello in Japanese: こんにちは 👋"}]
        whole = client.messages.create(model="smollm2", max_tokens=24, messages=messages, system="Be brief.")
        with client.messages.stream(model="smollm2", max_tokens=24, messages=messages, system="Be brief.") as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert whole.content[0].type == "text"
        assert whole.content[0].text == streamed == final.content[0].text  # type: ignore[union-attr]
        assert "\ufffd" not in streamed
        forced_tool: Any = [{"name": "greet", "description": "Greet", "input_schema": GREETING_SCHEMA}]
        with client.messages.stream(
            model="smollm2", max_tokens=128, messages=messages, tools=forced_tool, tool_choice={"type": "any"}
        ) as stream:
            greeted = stream.get_final_message()
        assert [b.input for b in greeted.content if b.type == "tool_use"] == [{"greeting": GREETING}]
        count = client.messages.count_tokens(model="smollm2", messages=messages, system="Be brief.")
        assert count.input_tokens == whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0)
        tools: Any = [{"name": "get_weather", "description": "Weather of a city", "input_schema": WEATHER_SCHEMA}]
        ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = client.messages.create(
            model="smollm2",
            max_tokens=64,
            messages=ask,
            tools=tools,
            tool_choice={"type": "tool", "name": "get_weather"},
        )
        assert first.stop_reason == "tool_use"
        use = next(b for b in first.content if b.type == "tool_use")
        assert use.name == "get_weather"
        assert isinstance(use.input["city"], str)
        follow: Any = [
            *ask,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 °C"}]},
        ]
        second = client.messages.create(
            model="smollm2", max_tokens=32, messages=follow, tools=tools, tool_choice={"type": "none"}
        )
        assert second.content[0].type == "text"
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(model="nope", max_tokens=4, messages=ask)


def test_ollama_client(server: tuple[Runtime, str]) -> None:
    rt, base = server
    with ollama.Client(host=base) as client:
        _ollama_checks(rt, client)


def _ollama_checks(rt: Runtime, client: ollama.Client) -> None:
    msgs = [{"role": "user", "content": "Write one word in Chinese: 你好 🌏"}]
    whole = client.chat(model="smollm2", messages=msgs, options={"temperature": 0, "num_predict": 24})
    streamed = "".join(
        part.message.content or ""
        for part in client.chat(
            model="smollm2", messages=msgs, options={"temperature": 0, "num_predict": 24}, stream=True
        )
    )
    assert whole.message.content == streamed
    assert "\ufffd" not in streamed
    parts = [
        p.message.content or ""
        for p in client.chat(
            model="smollm2", messages=msgs, format=GREETING_SCHEMA, stream=True, options={"num_predict": 48}
        )
    ]
    assert json.loads("".join(parts)) == {"greeting": GREETING}
    assert whole.eval_count
    gen = client.generate(model="smollm2", prompt="Count to three:", options={"temperature": 0, "num_predict": 12})
    assert gen.response
    assert gen.done
    structured = client.chat(
        model="smollm2",
        messages=[{"role": "user", "content": "Ada Lovelace as JSON with name and age."}],
        format=PERSON_SCHEMA,
        options={"temperature": 0, "num_predict": 64},
    )
    assert isinstance(json.loads(structured.message.content or "")["age"], int)
    assert len(client.embed(model="smollm2", input=["a", "b"]).embeddings) == 2
    assert {m.model for m in client.list().models} == {"smollm2", "smollm2:135m"}
    assert client.show("smollm2").details is not None
    # on demand: the models dir's entry loads, shows in ps, and unloads with keep_alive 0
    client.generate(model="smollm2:135m", prompt="")
    assert "smollm2:135m" in {m.model for m in client.ps().models}
    client.generate(model="smollm2:135m", prompt="", keep_alive=0)
    assert "smollm2:135m" not in rt.models()
    with pytest.raises(ollama.ResponseError):
        client.chat(model="nope", messages=msgs)


def _turns(send: Any, n: int = 3) -> list[int]:
    """Run a stateless conversation of ``n`` turns; ``send(messages) -> (reply, cached tokens)``."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a geography tutor. " * 20},
        {"role": "user", "content": "Name a country in Europe."},
    ]
    cached = []
    for i in range(n):
        reply, hit = send(messages)
        cached.append(hit)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Another one ({i})."}]
    return cached


def test_stateless_multi_turn_hits_the_cache_in_every_dialect(server: tuple[Runtime, str]) -> None:
    rt, base = server
    oa = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    an = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
    ol = ollama.Client(host=base)

    def via_openai(messages: Any) -> tuple[str, int]:
        r = oa.chat.completions.create(model="smollm2", messages=messages, max_tokens=12)
        assert r.usage is not None
        assert r.usage.prompt_tokens_details is not None
        return r.choices[0].message.content or "", r.usage.prompt_tokens_details.cached_tokens or 0

    def via_anthropic(messages: Any) -> tuple[str, int]:
        r = an.messages.create(model="smollm2", max_tokens=12, system=messages[0]["content"], messages=messages[1:])
        return r.content[0].text, r.usage.cache_read_input_tokens or 0  # type: ignore[union-attr]

    def via_ollama(messages: Any) -> tuple[str, int]:
        r = ol.chat(model="smollm2", messages=messages, options={"temperature": 0, "num_predict": 12})
        hit = rt.last_cache_hit("smollm2")
        assert hit is not None
        return r.message.content or "", hit["prefix_len"]

    for send, salt in ((via_openai, "A"), (via_anthropic, "B"), (via_ollama, "C")):

        def salted(messages: Any, send: Any = send, salt: str = salt) -> tuple[str, int]:
            reply: tuple[str, int] = send(
                [{**messages[0], "content": f"[{salt}] {messages[0]['content']}"}, *messages[1:]]
            )
            return reply

        cached = _turns(salted)
        assert cached[0] == 0, (salt, cached)  # a new conversation is cold
        assert cached[1] > 100, (salt, cached)  # turn 2 restores the system prompt and turn 1
        assert cached[2] > cached[1], (salt, cached)
    oa.close()
    an.close()
    ol.close()  # type: ignore[no-untyped-call]
