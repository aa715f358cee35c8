"""``create_app``: the ASGI application of the daemon (FastAPI), one router per dialect over one runtime.

Cross-cutting rules live here: the optional API key, the body-size bound, and turning malformed requests into the
dialect's 400 instead of FastAPI's 422. Health: ``/health`` (the process is up) and ``/health/ready`` (every served
model is running).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from erllama.runtime import Runtime
from erllama.server import openai
from erllama.server.state import ServerConfig, ServerState

__all__ = ["create_app"]


def create_app(runtime: Runtime, models: Mapping[str, str], config: ServerConfig | None = None) -> FastAPI:
    """An app serving ``models`` (served name -> runtime model id) of ``runtime``."""
    cfg = config or ServerConfig()
    app = FastAPI(title="erllama", docs_url=None, redoc_url=None)
    app.state.erllama = ServerState(runtime, models, cfg)
    app.include_router(openai.router)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path.startswith("/health"):
            return await call_next(request)
        presented = _presented_key(request) or ""
        if cfg.api_key is not None and not hmac.compare_digest(presented.encode(), cfg.api_key.encode()):
            return openai.error_response(
                401, "Invalid or missing API key", "authentication_error", code="invalid_api_key"
            )
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return openai.error_response(
                413, f"Request body exceeds {cfg.max_body_bytes} bytes", "invalid_request_error"
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return openai.error_response(
            400, f"{first.get('msg', 'invalid request')} ({where or 'body'})", "invalid_request_error", where
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(request: Request) -> JSONResponse:
        state: ServerState = request.app.state.erllama
        statuses = {name: state.runtime.status(state.resolve(name)) for name in state.model_names()}
        ok = all(s == "running" for s in statuses.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "models": statuses}, status_code=200 if ok else 503
        )

    return app


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")
