"""``create_app``: the ASGI application of the daemon (FastAPI), one router per dialect over one runtime.

Cross-cutting rules live here: the optional API key, the body-size bound, turning malformed requests into the
dialect's 400 (never FastAPI's 422), CORS (off unless origins are configured), request metrics, ``/metrics``,
``/health`` (the process is up) and ``/health/ready`` (every loaded model is running). A background task unloads
models whose keep-alive ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from erllama.runtime import Runtime
from erllama.server import anthropic, ollama, openai
from erllama.server.state import ModelSource, ServerConfig, ServerState

__all__ = ["create_app"]


def _dialect(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/"):
        return "openai"
    return "server"


def _error(dialect: str, status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    if dialect == "anthropic":
        return anthropic.error_response(status, message)
    if dialect == "ollama":
        return ollama.error_response(status, message)
    return openai.error_response(status, message, kind)


def create_app(
    runtime: Runtime,
    models: Mapping[str, str],
    config: ServerConfig | None = None,
    *,
    source: ModelSource | None = None,
) -> FastAPI:
    """An app serving ``models`` (served name -> runtime model id) of ``runtime``, and those ``source`` can load."""
    cfg = config or ServerConfig()
    state = ServerState(runtime, models, cfg, source)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(state.reaper())
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper

    app = FastAPI(title="erllama", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.erllama = state
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        dialect = _dialect(path)
        if path.startswith("/health") or path == "/metrics" or request.method == "OPTIONS":
            return await call_next(request)
        presented = _presented_key(request) or ""
        if cfg.api_key is not None and not hmac.compare_digest(presented.encode(), cfg.api_key.encode()):
            return _error(dialect, 401, "Invalid or missing API key", "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return _error(dialect, 413, f"Request body exceeds {cfg.max_body_bytes} bytes")
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.scope.get("route")
        label = getattr(endpoint, "path", "unmatched")
        state.metrics.requests.labels(dialect, label, str(response.status_code)).inc()
        state.metrics.latency.labels(dialect, label).observe(time.perf_counter() - t0)
        return response

    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        dialect = _dialect(request.url.path)
        message = f"{first.get('msg', 'invalid request')} ({where})"
        if dialect == "openai":
            return openai.error_response(400, message, "invalid_request_error", where)
        return _error(dialect, 400, message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(_dialect(request.url.path), exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(request: Request) -> JSONResponse:
        statuses = {name: state.runtime.status(mid) for name, (mid, _) in state.loaded().items()}
        ok = all(s == "running" for s in statuses.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "models": statuses}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")
