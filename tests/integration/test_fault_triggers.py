"""The request faults that took the real SmolLM2 worker down, one by one: each is refused with a 4xx, the worker
never restarts, and no slot leaks (the model still serves ``--parallel`` requests at once afterwards)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.model import LlamaBackend
from erllama.server import ServerConfig, create_app
from erllama.testing import serve_app

pytestmark = [pytest.mark.native, pytest.mark.smollm2]

HI = [{"role": "user", "content": "hi"}]
SURROGATE = '{"model": "m", "max_tokens": 4, "stream": %s, "messages": [{"role": "user", "content": "\\ud800"}]}'


def schema_body(schema: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": HI,
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }


TRIGGERS: list[tuple[str, str, Any]] = [
    ("openai surrogate", "/v1/chat/completions", SURROGATE % "false"),
    ("openai surrogate, streamed", "/v1/chat/completions", SURROGATE % "true"),
    ("anthropic surrogate", "/v1/messages", SURROGATE % "false"),
    ("anthropic surrogate, streamed", "/v1/messages", SURROGATE % "true"),
    ("ollama surrogate", "/api/chat", SURROGATE % "false"),
    ("ollama surrogate, streamed", "/api/chat", SURROGATE % "true"),
    ("logit_bias outside the vocabulary", "/v1/chat/completions",
     {"model": "m", "messages": HI, "max_tokens": 4, "logit_bias": {"99999999": 5}}),
    ("ollama top_k >= 2**31", "/api/chat",
     {"model": "m", "messages": HI, "stream": False, "options": {"top_k": 2**31}}),
    ("ollama repeat_last_n >= 2**31", "/api/chat",
     {"model": "m", "messages": HI, "stream": False, "options": {"repeat_last_n": 2**31}}),
    ("ollama NaN temperature", "/api/generate",
     '{"model": "m", "prompt": "x", "stream": false, "options": {"temperature": NaN}}'),
    ("ollama Infinity penalty", "/api/generate",
     '{"model": "m", "prompt": "x", "stream": false, "options": {"presence_penalty": Infinity}}'),
    ("a grammar llama.cpp refuses", "/v1/chat/completions", schema_body({"type": "string", "minLength": 100000000})),
    ("a self-referencing $ref", "/v1/chat/completions",
     schema_body({"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}, "required": ["a"]})),
    ("an invalid regex pattern", "/v1/chat/completions", schema_body({"type": "string", "pattern": "(["})),
    ("an unknown schema type", "/v1/chat/completions", schema_body({"type": "frobnicate"})),
    ("a tool name with spaces", "/v1/chat/completions",
     {"model": "m", "messages": HI, "max_tokens": 4,
      "tools": [{"type": "function", "function": {"name": "get weather", "parameters": {"type": "object"}}}]}),
    ("a negative thinking budget", "/v1/messages",
     {"model": "m", "messages": HI, "max_tokens": 4, "thinking": {"type": "enabled", "budget_tokens": -5}}),
    ("embedding token ids outside int32", "/v1/embeddings", {"model": "m", "input": [-3936960288911]}),
]  # fmt: skip


@pytest.fixture(scope="module")
def daemon(smollm2_path: Path) -> Iterator[tuple[str, Runtime]]:
    rt = Runtime(None)
    cfg = ContextConfig(n_ctx=2 * 1024, n_batch=256, n_seq_max=2, embeddings=False)
    rt.load_model(backend=lambda: LlamaBackend(smollm2_path, context_config=cfg), model_id="m")
    try:
        with serve_app(create_app(rt, {"m": "m"}, ServerConfig(queue_timeout_s=30))) as base:
            yield base, rt
    finally:
        rt.close()


@pytest.mark.parametrize(("what", "path", "body"), TRIGGERS, ids=[t[0] for t in TRIGGERS])
def test_a_request_fault_is_that_requests_alone(daemon: tuple[str, Runtime], what: str, path: str, body: Any) -> None:
    base, rt = daemon
    with httpx.Client(base_url=base, timeout=60) as client:
        if isinstance(body, str):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(path, json=body)
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
        assert rt.model_info("m")["restarts"] == 0
        assert rt.status("m") == "running"


def test_after_the_faults_every_slot_serves(daemon: tuple[str, Runtime]) -> None:
    base, rt = daemon
    with httpx.Client(base_url=base, timeout=60) as client:
        client.post("/api/generate", json={"model": "m", "prompt": "x", "stream": False, "keep_alive": 1e13})
        assert client.get("/api/ps").status_code == 200
        body = {"model": "m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(2)))
    assert [r.status_code for r in replies] == [200, 200]
    assert rt.model_info("m")["restarts"] == 0
