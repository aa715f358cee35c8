"""The ingress's routing tokens are the tokens the replica runs (issue 22): for each dialect's generating endpoints,
the prompt the ingress renders with the vocabulary-only model equals, token for token, the context the server put
in its cache for the same request."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.cluster.prompts import RoutingPrompts, VocabModel
from erllama.model import LlamaBackend
from erllama.server import create_app
from erllama.testing.agents import claude_code_session, tool_loop

pytestmark = [pytest.mark.native, pytest.mark.smollm2]

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def setup(smollm2_path: Path, native: None) -> Iterator[tuple[Runtime, Any, RoutingPrompts]]:
    rt = Runtime(CacheStore([RamTier(1 << 30)]), policy=SavePolicy(min_tokens=8))
    cfg = ContextConfig(n_ctx=2048, n_batch=256, n_seq_max=1)
    rt.load_model(backend=lambda: LlamaBackend(smollm2_path, context_config=cfg), model_id="smollm2")
    vocab = VocabModel(smollm2_path)
    yield rt, create_app(rt, {"smollm2": "smollm2"}), RoutingPrompts(vocab)
    vocab.close()
    rt.close()


def _bodies(tag: str) -> list[tuple[str, dict[str, Any]]]:
    system = f"{tag} You are terse. Answer with one word."
    return [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]},
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": f"{tag} Weather in Paris?"}], "tools": [WEATHER]},
        ),
        ("/v1/messages", {"system": system, "messages": [{"role": "user", "content": "Hello there"}]}),
        ("/api/chat", {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hey"}]}),
        ("/api/generate", {"system": system, "prompt": "Say yes"}),
        ("/api/generate", {"prompt": f"{tag} raw text that goes in as it is", "raw": True}),
        ("/v1/completions", {"prompt": f"{tag} Once upon a time"}),
        ("/completion", {"prompt": f"{tag} In the beginning"}),
        *_agent_bodies(tag),
    ]


def _agent_bodies(tag: str) -> list[tuple[str, dict[str, Any]]]:
    """Agent-shaped requests: the ingress applies the replicas' stable-prefix rewrites too (a billing header,
    parallel results, tools out of order, Ollama's id-less calls, a prompt_cache_key)."""
    seed = int(uuid.UUID(tag)) % 1000
    claude = claude_code_session(2, model="-", system_words=60, result_words=4, seed=seed)[1]
    loop = tool_loop("openai", 3, model="-", system_words=40, seed=seed)[-1]
    loop["tools"] = loop["tools"][::-1]
    ollama = tool_loop("ollama", 3, model="-", system_words=40, seed=seed + 1)[-1]
    drop = ("model", "max_tokens", "options", "stream", "temperature")
    return [
        ("/v1/messages", {k: v for k, v in claude.items() if k not in drop}),
        ("/v1/chat/completions", {k: v for k, v in loop.items() if k not in drop} | {"prompt_cache_key": tag}),
        ("/api/chat", {k: v for k, v in ollama.items() if k not in drop}),
    ]


def test_the_ingress_tokens_are_the_tokens_the_replica_runs(setup: tuple[Runtime, Any, RoutingPrompts]) -> None:
    rt, app, prompts = setup
    namespace = rt.cache_namespace("smollm2")
    assert namespace is not None
    assert rt.cache is not None

    async def send(path: str, body: dict[str, Any]) -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            r = await c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)

    for path, fields in _bodies(str(uuid.uuid4())):
        limit = {"num_predict": 2} if path.startswith("/api/") else {"max_tokens": 2, "n_predict": 2}
        body = {
            "model": "smollm2",
            **fields,
            **({"options": limit, "stream": False} if path.startswith("/api/") else limit),
        }
        asyncio.run(send(path, body))
        assert rt.cache.drain(30)
        tokens = prompts.tokens(path, json.dumps(body).encode())
        assert tokens is not None, path
        row = rt.cache.deepest_shared(namespace, tokens, len(tokens))
        assert row is not None, (path, "no row shares a block with the ingress's tokens")
        assert row.n_tokens == len(tokens), (path, f"the replica's context departs from them at {row.n_tokens}")


def test_requests_that_generate_nothing_have_no_routing_tokens(setup: tuple[Runtime, Any, RoutingPrompts]) -> None:
    _, _, prompts = setup
    assert prompts.tokens("/v1/models", b"") is None
    assert prompts.tokens("/v1/chat/completions", b"{not json") is None
    assert prompts.tokens("/v1/chat/completions", b'{"messages": "nope"}') is None
    assert prompts.tokens("/api/chat", b'{"model": "x", "messages": []}') is None, "a load request"
    assert prompts.tokens("/v1/completions", b'{"prompt": [1, 2, 3]}') == [1, 2, 3]
