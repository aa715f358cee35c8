"""The daemon on a real socket (uvicorn) with a real model, driven by the official ``openai`` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.model import LlamaBackend
from erllama.server import create_app
from erllama.testing import serve_app

pytestmark = pytest.mark.native


@pytest.fixture
def base_url(model_path: Path) -> Iterator[str]:
    rt = Runtime(CacheStore([RamTier(1 << 30)]), policy=SavePolicy(min_tokens=8))
    cfg = ContextConfig(n_ctx=4096, n_batch=256, n_seq_max=2)
    model = rt.load_model(backend=lambda: LlamaBackend(model_path, context_config=cfg))
    try:
        with serve_app(create_app(rt, {"m": model})) as base:
            yield f"{base}/v1"
    finally:
        rt.close()
        assert rt.cache is not None
        rt.cache.close()


def test_chat_over_http_with_the_official_client(base_url: str) -> None:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        messages: Any = [{"role": "user", "content": "Name three colours. 🎉 世界"}]
        first = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="m", messages=messages, max_tokens=16, temperature=0, stream=True
            )
            if chunk.choices
        )
        assert first.choices[0].message.content == streamed
        assert first.usage is not None
        again = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
        assert again.usage is not None
        assert again.usage.prompt_tokens_details is not None
        assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
        assert again.choices[0].message.content == first.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=messages, max_tokens=2)
        assert [m.id for m in client.models.list()] == ["m"]
