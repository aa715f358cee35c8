"""An HTTP request carried to a replica's ASGI app and its response streamed back: start, chunks, the app's
errors, and a caller that stops reading (the app sees a disconnect)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from erllama.cluster.bridge import Forwarded, Lifespan, ResponseStart, run_request


def _app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, object]:
        body = await request.json()
        return {"got": body, "host": request.headers["host"], "q": request.query_params.get("x")}

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            try:
                for i in range(1000):
                    yield f"chunk {i}\n".encode()
                    await asyncio.sleep(0.01)
            finally:
                events.append("generator closed")

        return StreamingResponse(gen(), media_type="text/plain")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


async def _collect(app: FastAPI, req: Forwarded) -> list[ResponseStart | bytes]:
    return [part async for part in run_request(app, req, extra_headers=((b"x-who", b"r1"),))]


def test_a_request_and_its_response() -> None:
    req = Forwarded(
        "POST", "/echo", b"x=1", ((b"host", b"localhost"), (b"content-type", b"application/json")), b'{"a":1}'
    )
    parts = asyncio.run(_collect(_app([]), req))
    start = parts[0]
    assert isinstance(start, ResponseStart)
    assert start.status == 200
    assert (b"x-who", b"r1") in start.headers
    assert b"".join(p for p in parts[1:] if isinstance(p, bytes)) == b'{"got":{"a":1},"host":"localhost","q":"1"}'


def test_an_app_error_is_a_500_response() -> None:
    parts = asyncio.run(_collect(_app([]), Forwarded("GET", "/boom")))
    # FastAPI's ServerErrorMiddleware answers 500, then re-raises: the caller sees the response, then the error
    assert isinstance(parts[0], ResponseStart)
    assert parts[0].status == 500


def test_a_caller_that_stops_reading_disconnects_the_app() -> None:
    events: list[str] = []

    async def main() -> int:
        n = 0
        stream = run_request(_app(events), Forwarded("GET", "/stream"))
        async for _ in stream:
            n += 1
            if n == 5:
                break
        await stream.aclose()
        return n

    assert asyncio.run(main()) == 5
    assert events == ["generator closed"], "the app's streaming generator was stopped, not left running"


def test_the_lifespan_runs_startup_and_shutdown() -> None:
    import contextlib

    seen: list[str] = []

    @contextlib.asynccontextmanager
    async def life(_app: FastAPI):  # type: ignore[no-untyped-def]
        seen.append("up")
        yield
        seen.append("down")

    app = FastAPI(lifespan=life)

    async def main() -> None:
        span = Lifespan(app)
        await span.start()
        await span.stop()

    asyncio.run(main())
    assert seen == ["up", "down"]


def test_a_failed_startup_is_an_error() -> None:
    import contextlib

    @contextlib.asynccontextmanager
    async def life(_app: FastAPI):  # type: ignore[no-untyped-def]
        raise ValueError("no model")
        yield

    with pytest.raises(RuntimeError, match="startup failed"):
        asyncio.run(Lifespan(FastAPI(lifespan=life)).start())
