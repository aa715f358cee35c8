"""A runtime with two scripted stub models for the dialect tests.

``hermes`` has a Jinja template that knows tools (Hermes / Qwen ``<tool_call>`` blocks); ``plain`` has none, so it
gets llama.cpp-free built-in rendering and the generic JSON tool convention. Both answer from a script, the way an
instruction-tuned model would, so replies are predictable and parseable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from erllama import Runtime
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.model import StubBackend
from erllama.server import ServerConfig, create_app

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}"
    '</tools>\nCall a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
    '{% for c in m.tool_calls %}<tool_call>\n{"name": "{{ c.function.name }}", "arguments": '
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GREETING = "Hello, 世界! 👋 Nice to meet you."


def script(prompt: bytes) -> bytes | None:
    """The scripted model: looks at the last user turn of the prompt and answers."""
    text = prompt.decode("utf-8", "replace")
    last = text.rsplit("user", 1)[-1]
    if "sunny" in last or "Result of the tool" in last or "tool\n" in text.rsplit("assistant", 2)[-1][-40:]:
        return b"It is sunny in Paris."
    if "weather" in last:
        if "<tools>" in text:
            call = {"name": "get_weather", "arguments": {"city": "Paris"}}
            return f"<tool_call>\n{json.dumps(call)}\n</tool_call>".encode()
        return json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}).encode()
    if "JSON" in last:
        return b'{"name": "Ada", "age": 36}'
    if "think" in last:
        return b"<think>2 + 2 is 4</think>The answer is 4."
    if "long" in last:
        return None  # the hash model: as long as max_tokens
    return GREETING.encode()


@pytest.fixture
def srt() -> Iterator[Runtime]:
    runtime = Runtime(CacheStore([RamTier(1 << 24)]), policy=SavePolicy(min_tokens=8))
    runtime.load_model(
        backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0, chat_template=HERMES_TEMPLATE, script=script),
        model_id="hermes",
    )
    runtime.load_model(backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0, script=script), model_id="plain")
    yield runtime
    runtime.close()
    assert runtime.cache is not None
    runtime.cache.close()


def request(
    rt: Runtime,
    method: str,
    path: str,
    config: ServerConfig | None = None,
    *,
    models: dict[str, str] | None = None,
    **kw: Any,
) -> httpx.Response:
    app = create_app(rt, models or {"hermes": "hermes", "plain": "plain"}, config)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())
