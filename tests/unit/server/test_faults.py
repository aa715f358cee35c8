"""Faults are contained: a bad request fails alone (answered, its slot freed, the worker untouched); requests that
arrive together cannot overrun the queue bound; a worker that itself dies is restarted, and once its restart
budget is spent every request is refused at once (no hang, no leaked slot)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from erllama import Runtime
from erllama.model import StubBackend
from erllama.server import ServerConfig, create_app
from erllama.server.models import ModelDirectory
from erllama.server.state import ServerState

CHAT = [{"role": "user", "content": "hi"}]
SURROGATE = '{"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "\\ud800"}]}'


def routes(body_model: str = "m") -> list[tuple[str, dict[str, Any]]]:
    return [
        ("/v1/chat/completions", {"model": body_model, "messages": CHAT, "max_tokens": 4}),
        ("/v1/messages", {"model": body_model, "messages": CHAT, "max_tokens": 4}),
        ("/api/chat", {"model": body_model, "messages": CHAT, "stream": False, "options": {"num_predict": 4}}),
    ]


async def post_all(
    app: Any, calls: list[tuple[str, dict[str, Any] | str]], timeout: float = 20
) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", timeout=timeout
    ) as c:

        async def one(path: str, body: dict[str, Any] | str) -> httpx.Response:
            if isinstance(body, str):
                return await c.post(path, content=body, headers={"content-type": "application/json"})
            return await c.post(path, json=body)

        return list(await asyncio.gather(*(one(p, b) for p, b in calls)))


def restarts(rt: Runtime, model_id: str = "m") -> int:
    return rt._entry(model_id).supervisor.restart_count


def test_request_faults_fail_alone_in_every_dialect() -> None:
    rt = Runtime()
    rt.load_model(backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0), model_id="m")
    try:
        app = create_app(rt, {"m": "m"})
        bad: list[tuple[str, dict[str, Any] | str]] = []
        for path in ("/v1/chat/completions", "/v1/messages", "/api/chat"):
            bad += [(path, SURROGATE)] * 2  # more than the restart budget, were each a crash
        bad += [
            ("/v1/chat/completions", {"model": "m", "messages": CHAT, "max_tokens": 4, "logit_bias": {"99999999": 1}}),
            ("/api/chat", {"model": "m", "messages": CHAT, "stream": False, "options": {"top_k": 2**31}}),
            ("/api/chat", {"model": "m", "messages": CHAT, "stream": False, "options": {"repeat_last_n": 2**40}}),
            ("/api/generate", {"model": "m", "prompt": "x", "stream": False, "options": {"presence_penalty": "NaN"}}),
            (
                "/v1/chat/completions",
                {"model": "m", "messages": CHAT, "max_tokens": 4, "stream": True, "logit_bias": {"99999999": 1}},
            ),
        ]

        async def scenario() -> None:
            out = await post_all(app, bad)
            for (path, _), r in zip(bad, out, strict=True):
                assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
            assert "not valid Unicode" in out[0].text
            assert restarts(rt) == 0
            assert rt.status("m") == "running"
            good = await post_all(app, list(routes()))
            assert [r.status_code for r in good] == [200, 200, 200]
            state: ServerState = app.state.erllama
            assert state.queue_depth("m") == (0, 0), "no slot leaked"

        asyncio.run(scenario())
    finally:
        rt.close()


def test_simultaneous_arrivals_respect_the_queue_bound() -> None:
    rt = Runtime()
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1, eos_bias=-50.0, step_delay_s=0.01), model_id="m")
    try:
        for path, body in routes():
            app = create_app(rt, {"m": "m"}, ServerConfig(max_concurrency=1, max_queue=2))
            calls: list[tuple[str, dict[str, Any] | str]] = [(path, body)] * 20
            out = asyncio.run(post_all(app, calls))
            codes = sorted(r.status_code for r in out)
            assert codes.count(200) == 3, (path, codes)  # one running, two waiting
            assert len([c for c in codes if c in (429, 503, 529)]) == 17, (path, codes)
            assert all(r.headers.get("retry-after") for r in out if r.status_code != 200)
    finally:
        rt.close()


class DiesOnMarker(StubBackend):
    """The worker itself dies (a decode fails, as a native fault would) when a prompt holds the marker text."""

    MARKER = 3 + ord("\x07")

    def decode(self, items):  # type: ignore[no-untyped-def]
        if any(self.MARKER in item.tokens for item in items):
            raise RuntimeError("injected worker death")
        return super().decode(items)


def test_a_dying_worker_restarts_then_the_model_is_refused_at_once() -> None:
    rt = Runtime()
    rt.load_model(backend=lambda: DiesOnMarker(n_seq_max=2, eos_bias=-50.0), model_id="m")
    rt._entry("m").supervisor.max_restarts = 2
    try:
        app = create_app(rt, {"m": "m"}, ServerConfig(queue_timeout_s=30))
        state: ServerState = app.state.erllama
        killer = (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "\x07"}], "max_tokens": 4},
        )

        async def scenario() -> None:
            for expected in (1, 2):
                (r,) = await post_all(app, [killer])
                assert r.status_code == 503, r.text
                assert "/" not in r.json()["error"]["message"], "no internal paths in the message"

                # the request's error goes out before the dying worker hands over to its supervisor
                def restarted(n: int = expected) -> bool:
                    return restarts(rt) == n and rt.status("m") == "running"

                assert await _wait_for(restarted)
                (ok,) = await post_all(app, [routes()[0]])
                assert ok.status_code == 200, "it serves again after the restart"
            (r,) = await post_all(app, [killer])
            assert r.status_code == 503
            assert await _wait_for(lambda: rt.status("m") == "failed")
            took, codes = await _timed(app, routes())
            assert took < 5.0, "refused at once, not after the 30 s queue timeout"
            assert codes == [503, 529, 503]
            assert state.queue_depth("m") == (0, 0), "no slot leaked"
            assert '"failed"' in await _get(app, "/health/ready")

        asyncio.run(scenario())
    finally:
        rt.close()


async def _wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False


async def _timed(app: Any, calls: list[tuple[str, dict[str, Any]]]) -> tuple[float, list[int]]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await post_all(app, list(calls))
    return loop.time() - t0, [r.status_code for r in out]


async def _get(app: Any, path: str) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        return (await c.get(path)).text


def test_requests_never_unload_the_model_served_from_startup(tmp_path: Path) -> None:
    """``--model`` is pinned: ``keep_alive: 0`` and ``/api/delete`` of its name are refused (and unload nothing);
    an absurd keep-alive is "forever", so ``/api/ps`` still renders."""
    rt = Runtime()
    (tmp_path / "other.gguf").write_bytes(b"GGUF-stub")
    (tmp_path / "m.gguf").write_bytes(b"GGUF-stub")

    def load(runtime: Runtime, path: Path, name: str) -> str:
        return runtime.load_model(backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0), model_id=name)

    source = ModelDirectory(tmp_path, load)
    rt.load_model(backend=lambda: StubBackend(n_seq_max=2, eos_bias=-50.0), model_id="m")
    try:
        app = create_app(rt, {"m": "m"}, source=source)

        async def scenario() -> None:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                r = await c.post("/api/generate", json={"model": "m", "prompt": "", "keep_alive": 0})
                assert r.status_code == 400, r.text
                assert "stays loaded" in r.json()["error"]
                r = await c.request("DELETE", "/api/delete", json={"model": "m"})
                assert r.status_code == 400
                assert rt.models() == ["m"]
                body = {"model": "m", "prompt": "x", "stream": False, "keep_alive": 1e13}
                assert (await c.post("/api/generate", json=body)).status_code == 200
                body["model"] = "other"
                assert (await c.post("/api/generate", json=body)).status_code == 200
                ps = await c.get("/api/ps")
                assert ps.status_code == 200
                assert sorted(m["name"] for m in ps.json()["models"]) == ["m", "other"]
                r = await c.post("/api/generate", json={"model": "m", "prompt": "x", "stream": False})
                assert r.status_code == 200

        asyncio.run(scenario())
        assert sorted(rt.models()) == ["m", "other"]
    finally:
        rt.close()


def test_chunked_bodies_are_bounded_and_huge_prompts_are_not_tokenized() -> None:
    rt = Runtime()
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1, n_ctx_seq=256, eos_bias=-50.0), model_id="m")
    try:
        app = create_app(rt, {"m": "m"}, ServerConfig(max_body_bytes=4096))
        big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 10_000}]}).encode()

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: sent chunked
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        async def scenario() -> None:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                for path in ("/v1/chat/completions", "/v1/messages", "/api/chat"):
                    r = await c.post(path, content=chunks(), headers={"content-type": "application/json"})
                    assert r.status_code == 413, (path, r.status_code, r.text)
                    assert "exceeds 4096 bytes" in r.text
                # under the body bound but longer than the context can hold: refused without tokenizing
                text = "y" * 3000
                body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4}
                r = await c.post("/v1/chat/completions", json=body)
                assert r.status_code == 400
                assert "at least" in r.text  # refused by length, before tokenizing
                assert r.json()["error"]["code"] == "context_length_exceeded"

        asyncio.run(scenario())
    finally:
        rt.close()


def test_a_keyless_daemon_answers_only_its_own_addresses() -> None:
    """DNS rebinding: a web page at evil.example makes its name resolve to 127.0.0.1 and drives the daemon."""
    rt = Runtime()
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1, eos_bias=-50.0), model_id="m")
    try:
        for config, host, expected in [
            (ServerConfig(), "evil.example", 403),
            (ServerConfig(), "evil.example:11434", 403),
            (ServerConfig(), "127.0.0.1:11434", 200),
            (ServerConfig(), "[::1]:11434", 200),
            (ServerConfig(), "localhost:11434", 200),
            (ServerConfig(allowed_hosts=("gpu-box.lan",)), "gpu-box.lan:11434", 200),
            (ServerConfig(api_key="k"), "evil.example", 401),  # the key guards every name
        ]:
            app = create_app(rt, {"m": "m"}, config)

            async def go(app: Any = app, host: str = host) -> int:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                    return (await c.get("/api/tags", headers={"host": host})).status_code

            assert asyncio.run(go()) == expected, (config, host)
    finally:
        rt.close()


def test_the_openapi_document_declares_what_the_server_sends() -> None:
    rt = Runtime()
    rt.load_model(backend=lambda: StubBackend(n_seq_max=1), model_id="m")
    try:
        doc = create_app(rt, {"m": "m"}, ServerConfig(api_key="k")).openapi()
    finally:
        rt.close()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat
    assert {"400", "401", "404", "413", "429", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]
    assert "529" in doc["paths"]["/v1/messages"]["post"]["responses"]
    assert "application/x-ndjson" in doc["paths"]["/api/chat"]["post"]["responses"]["200"]["content"]
    assert not any("422" in op["responses"] for ops in doc["paths"].values() for op in ops.values())
