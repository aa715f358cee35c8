"""A client that drops the connection mid-stream cancels its request: the sequence is freed at once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest

from erllama import Runtime
from erllama.model import StubBackend
from erllama.server import create_app
from erllama.testing import serve_app


@pytest.fixture
def served() -> Iterator[tuple[Runtime, str]]:
    rt = Runtime(None)
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1, eos_bias=-50.0, step_delay_s=0.002), model_id="slow")
    try:
        with serve_app(create_app(rt, {"slow": "slow"})) as base:
            yield rt, base
    finally:
        rt.close()


def test_dropping_the_connection_mid_stream_cancels_the_request(served: tuple[Runtime, str]) -> None:
    rt, base = served
    body = {
        "model": "slow",
        "messages": [{"role": "user", "content": "talk for a long time"}],
        "max_tokens": 4000,
        "stream": True,
    }
    with (
        httpx.Client(base_url=base, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen == 5:
                    break  # leaving the block closes the connection
    deadline = time.monotonic() + 2  # the whole reply would take 8 s
    while rt.in_flight("slow") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.in_flight("slow") == 0, "the dropped request's sequence was freed"
    # the only sequence is free again: the next request is served at once, not after 4000 tokens
    t0 = time.monotonic()
    with httpx.Client(base_url=base, timeout=30) as client:
        resp = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
    assert resp.status_code == 200
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/chat/completions", {"stream": True}),
        ("/v1/chat/completions", {"stream": False}),
        ("/v1/messages", {"stream": True, "max_tokens": 50}),
        ("/api/chat", {"stream": False}),
    ],
)
def test_dropping_the_connection_mid_prefill_cancels_the_request(
    served: tuple[Runtime, str], path: str, extra: dict[str, object]
) -> None:
    """A long prompt (3,000 tokens: about 6 s of prefill on the slowed stub) and a client that gives up after 0.4 s."""
    rt, base = served
    body = {"model": "slow", "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 50, **extra}
    with (
        httpx.Client(base_url=base, timeout=0.4) as client,
        contextlib.suppress(httpx.TimeoutException),
        client.stream("POST", path, json=body) as r,
    ):
        for _ in r.iter_bytes():
            pass  # the first chunk (if any) comes at once; then nothing until the prefill ends
    deadline = time.monotonic() + 2.5  # one prefill chunk of 512 tokens takes about 1 s on this stub
    while rt.in_flight("slow") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.in_flight("slow") == 0, "the dropped request's sequence was freed within a prefill chunk"
    with httpx.Client(base_url=base, timeout=30) as client:
        t0 = time.monotonic()
        resp = client.post(
            "/v1/chat/completions",
            json={"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert resp.status_code == 200
        assert time.monotonic() - t0 < 2
        scrape = client.get("/metrics").text
    assert 'erllama_generations_total{model="slow",reason="cancelled"} 1.0' in scrape
