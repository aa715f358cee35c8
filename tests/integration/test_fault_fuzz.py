"""Hostile request bodies against the real SmolLM2 worker, on every route of every dialect.

Hypothesis builds bodies shaped like each route's own (so they get past the JSON parsing and reach the model),
with hostile values where values go: lone surrogates, control and special-token text, integers past int32 and
int64, NaN and infinities, out-of-vocabulary ``logit_bias`` ids, JSON schemas llama.cpp's grammar parser refuses
(huge repetitions, self-references, bad patterns), odd tool names, absurd keep-alives. Every request must be
answered — 200 or a 4xx, never a 5xx, never a hang — and the model's worker must never restart: a fault is that
request's alone. A plain request afterwards is served.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama import Runtime
from erllama._native import ContextConfig
from erllama.cache import CacheStore, RamTier, SavePolicy
from erllama.model import LlamaBackend
from erllama.server import ServerConfig, create_app
from erllama.testing import serve_app

pytestmark = [pytest.mark.native, pytest.mark.smollm2]

MODEL = "m"

TEXT = st.one_of(
    st.text(max_size=24),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),  # lone surrogates: "\ud800"
    st.sampled_from(["", "<|im_start|>", "<|im_end|>assistant", "\x00\x01", "A" * 3000, "🎉 世界", "\\ud800"]),
)
NUMBER = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**31 - 1, 2**63, -(2**63), 1e13, -3936960288911, 0.5]),
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBER | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
SCHEMA = st.one_of(
    st.sampled_from(
        [
            {"type": "string", "minLength": 100000000},
            {"type": "array", "items": {"type": "integer"}, "minItems": 99999999},
            {"$ref": "#"},
            {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}, "required": ["a"]},
            {"type": "string", "pattern": "(["},
            {"type": "string", "pattern": "^a{1,100000}$"},
            {"type": "frobnicate"},
            {"enum": []},
            {"type": "object", "properties": {"x": {"type": "integer", "minimum": 2**70}}},
            True,
            False,
            {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        ]
    ),
    JSON,
)
# Most values are valid, so that most bodies reach the model with one or two hostile values in them.
# (``one_of`` picks its branches uniformly: a branch listed three times is drawn three times as often.)
PLAIN = st.text(st.characters(codec="utf-8"), max_size=24)
SMALL = st.one_of(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6), NUMBER)
UNIT = st.floats(0.0, 1.0)
FLOAT = st.one_of(UNIT, UNIT, UNIT, NUMBER)
ROLE = st.one_of(st.just("user"), st.just("user"), st.sampled_from(["system", "assistant", "tool", "developer"]), TEXT)
CONTENT = st.one_of(
    PLAIN, PLAIN, TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2), JSON
)
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": CONTENT})
VALID_MESSAGES = st.lists(MESSAGE, min_size=1, max_size=3)
MESSAGES = st.one_of(VALID_MESSAGES, VALID_MESSAGES, VALID_MESSAGES, JSON)
TOOL_NAME = st.one_of(st.sampled_from(["get weather", "", "a" * 300, "ok_name", "x.y/z"]), TEXT)
OPENAI_TOOLS = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": TOOL_NAME, "parameters": SCHEMA})}
    ),
    max_size=2,
)
TOKEN_ID = st.integers(0, 49151).map(str)  # SmolLM2's vocabulary is 49152 tokens
LOGIT_BIAS = st.dictionaries(
    st.one_of(TOKEN_ID, TOKEN_ID, st.integers(-5, 2**40).map(str), TEXT),
    st.one_of(st.floats(-10, 10), NUMBER),
    max_size=3,
)
OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "num_predict": SMALL,
        "temperature": FLOAT,
        "top_k": SMALL,
        "top_p": FLOAT,
        "min_p": FLOAT,
        "repeat_penalty": FLOAT,
        "repeat_last_n": SMALL,
        "presence_penalty": FLOAT,
        "seed": NUMBER,
        "stop": st.lists(TEXT, max_size=2),
    },
)
COMMON = {"model": st.one_of(st.just(MODEL), st.just(MODEL), st.just(MODEL), st.just(MODEL), TEXT)}

BODIES: dict[str, st.SearchStrategy[Any]] = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {**COMMON, "messages": MESSAGES},
        optional={
            "max_tokens": SMALL,
            "max_completion_tokens": SMALL,
            "temperature": FLOAT,
            "top_p": FLOAT,
            "seed": NUMBER,
            "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
            "stream": st.booleans(),
            "logit_bias": LOGIT_BIAS,
            "logprobs": st.booleans(),
            "top_logprobs": NUMBER,
            "tools": OPENAI_TOOLS,
            "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]), JSON),
            "response_format": st.one_of(
                st.fixed_dictionaries(
                    {
                        "type": st.just("json_schema"),
                        "json_schema": st.fixed_dictionaries({"name": TEXT, "schema": SCHEMA}),
                    }
                ),
                st.just({"type": "json_object"}),
                JSON,
            ),
        },
    ),
    "/v1/completions": st.fixed_dictionaries(
        {**COMMON, "prompt": st.one_of(TEXT, st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=4))},
        optional={"max_tokens": SMALL, "logprobs": NUMBER, "logit_bias": LOGIT_BIAS, "stream": st.booleans()},
    ),
    "/v1/embeddings": st.fixed_dictionaries(
        {**COMMON, "input": st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(NUMBER, min_size=1, max_size=3))}
    ),
    "/v1/messages": st.fixed_dictionaries(
        {**COMMON, "messages": MESSAGES, "max_tokens": SMALL},
        optional={
            "system": st.one_of(TEXT, JSON),
            "temperature": FLOAT,
            "top_k": SMALL,
            "top_p": FLOAT,
            "stop_sequences": st.lists(TEXT, max_size=2),
            "stream": st.booleans(),
            "tools": st.lists(st.fixed_dictionaries({"name": TOOL_NAME, "input_schema": SCHEMA}), max_size=2),
            "thinking": st.fixed_dictionaries({"type": st.just("enabled"), "budget_tokens": NUMBER}),
        },
    ),
    "/v1/messages/count_tokens": st.fixed_dictionaries({**COMMON, "messages": MESSAGES}),
    "/api/chat": st.fixed_dictionaries(
        {**COMMON, "messages": MESSAGES},
        optional={
            "stream": st.booleans(),
            "options": OPTIONS,
            "format": st.one_of(st.just("json"), SCHEMA),
            "keep_alive": st.one_of(NUMBER, TEXT),
            "think": JSON,
            "tools": OPENAI_TOOLS,
        },
    ),
    "/api/generate": st.fixed_dictionaries(
        {**COMMON, "prompt": st.one_of(PLAIN, PLAIN, TEXT)},
        optional={
            "stream": st.booleans(),
            "options": OPTIONS,
            "format": st.one_of(st.just("json"), SCHEMA),
            "keep_alive": st.one_of(NUMBER, TEXT),
            "raw": st.booleans(),
            "system": TEXT,
            "context": st.lists(st.integers(-(2**40), 2**40), max_size=4),
        },
    ),
    "/api/embed": st.fixed_dictionaries({**COMMON, "input": st.one_of(TEXT, st.lists(TEXT, max_size=3), JSON)}),
    "/api/embeddings": st.fixed_dictionaries({**COMMON, "prompt": TEXT}),
    "/api/show": st.fixed_dictionaries(COMMON),
    "/api/pull": st.fixed_dictionaries(COMMON, optional={"stream": st.booleans()}),
    "/api/delete": st.fixed_dictionaries(COMMON),
    "/api/copy": st.fixed_dictionaries({"source": TEXT, "destination": TEXT}),
}
GETS = ["/v1/models", f"/v1/models/{MODEL}", "/api/version", "/api/tags", "/api/ps", "/health/ready", "/metrics"]


def _short(body: Any) -> Any:
    """Keep replies short (the fuzzing is about the input): big positive lengths are cut to 8 tokens."""
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and body[field] > 8:
                body[field] = 8
        options = body.get("options")
        if isinstance(options, dict) and isinstance(options.get("num_predict"), int) and options["num_predict"] > 8:
            options["num_predict"] = 8
    return body


@pytest.fixture(scope="module")
def daemon(smollm2_path: Path) -> Iterator[tuple[str, Runtime]]:
    rt = Runtime(CacheStore([RamTier(1 << 28)]), policy=SavePolicy(min_tokens=8))
    cfg = ContextConfig(n_ctx=2 * 2048, n_batch=256, n_seq_max=2)
    model_id = rt.load_model(backend=lambda: LlamaBackend(smollm2_path, context_config=cfg), model_id=MODEL)
    config = ServerConfig(default_max_tokens=8, max_body_bytes=1 << 20, queue_timeout_s=120)
    try:
        with serve_app(create_app(rt, {MODEL: model_id}, config)) as base:
            yield base, rt
    finally:
        rt.close()
        assert rt.cache is not None
        rt.cache.close()


# A valid body per route; each example overlays one to three fields of a hostile draw on it, so most requests
# get as far as the model with their hostile values.
HI = [{"role": "user", "content": "Hi"}]
BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": HI, "max_tokens": 4},
    "/v1/completions": {"model": MODEL, "prompt": "Once upon", "max_tokens": 4},
    "/v1/embeddings": {"model": MODEL, "input": "hello"},
    "/v1/messages": {"model": MODEL, "messages": HI, "max_tokens": 4},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": HI},
    "/api/chat": {"model": MODEL, "messages": HI, "stream": False, "options": {"num_predict": 4}},
    "/api/generate": {"model": MODEL, "prompt": "Once upon", "stream": False, "options": {"num_predict": 4}},
    "/api/embed": {"model": MODEL, "input": "hello"},
    "/api/embeddings": {"model": MODEL, "prompt": "hello"},
    "/api/show": {"model": MODEL},
    "/api/pull": {"model": MODEL},
    "/api/delete": {"model": MODEL},
    "/api/copy": {"source": MODEL, "destination": "copy"},
}
GENERATING = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/chat", "/api/generate"]
ROUTES = st.sampled_from(sorted(BODIES) + GENERATING * 3)


@settings(
    max_examples=int(os.environ.get("ERLLAMA_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=bool(os.environ.get("CI")),
)
@given(data=st.data())
def test_hostile_bodies_are_answered_and_never_restart_the_worker(
    daemon: tuple[str, Runtime], data: st.DataObject
) -> None:
    base, rt = daemon
    path = data.draw(ROUTES, label="path")
    hostile = data.draw(BODIES[path], label="hostile")
    fields = data.draw(st.lists(st.sampled_from(sorted(hostile)), min_size=1, max_size=3, unique=True), label="fields")
    body = _short({**BASES[path], **{f: hostile[f] for f in fields}})
    raw = json.dumps(body, allow_nan=True)  # NaN / Infinity as Python's (and Starlette's) JSON parser reads them
    method = "DELETE" if path == "/api/delete" else "POST"
    with httpx.Client(base_url=base, timeout=120) as client:
        with client.stream(method, path, content=raw, headers={"content-type": "application/json"}) as r:
            text = r.read().decode("utf-8", "replace")  # a stream is read to its end: never a hang
        status = r.status_code
        if os.environ.get("ERLLAMA_FUZZ_LOG"):
            with open(os.environ["ERLLAMA_FUZZ_LOG"], "a") as log:
                log.write(f"{status} {path} {raw[:150]!r} -> {text[:150]!r}\n")
        assert status < 500, (path, raw[:400], status, text[:400])
        assert status == 200 or 400 <= status < 500
        assert rt.model_info(MODEL)["restarts"] == 0, (path, raw[:400], text[:400])
        assert rt.status(MODEL) == "running"
        get = data.draw(st.sampled_from(GETS), label="get")
        assert client.get(get).status_code == 200, get


def test_a_plain_request_is_served_after_the_fuzzing(daemon: tuple[str, Runtime]) -> None:
    base, rt = daemon
    with httpx.Client(base_url=base, timeout=120) as client:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    assert rt.model_info(MODEL)["restarts"] == 0
    assert rt.status(MODEL) == "running"
