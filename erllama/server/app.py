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
import ipaddress
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from erllama.errors import ErllamaError
from erllama.runtime import Runtime
from erllama.server import anthropic, cache_api, llamacpp, ollama, openai
from erllama.server.notes import EXPLAIN_HEADER, HEADER, open_notes
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


# an ErllamaError a route raises, in the envelope of the dialect whose module defines the route
_MAP_ERROR: dict[str, Callable[[BaseException], JSONResponse]] = {
    m.__name__: m.map_error for m in (openai, anthropic, ollama, llamacpp)
} | {cache_api.__name__: openai.map_error}


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
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """An app serving ``models`` (served name -> runtime model id) of ``runtime``, and those ``source`` can load.

    ``on_shutdown`` runs (off the event loop) when the server shuts down gracefully, after the last request has
    ended: ``erllama serve`` closes the runtime there (shutdown saves, the writer drained), because uvicorn re-raises
    a SIGTERM or SIGINT it caught once its own shutdown is done, which ends the process before code after
    ``uvicorn.run`` could run."""
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
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="erllama", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.erllama = state
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)
    app.include_router(llamacpp.router)
    app.include_router(cache_api.router)

    app.add_middleware(_Guard, state=state)

    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[HEADER.decode()],
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_errors(
                get_openapi(title=app.title, version=app.version, routes=app.routes), cfg.api_key is not None
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        dialect = _dialect(request.url.path)
        message = f"{first.get('msg', 'invalid request')} ({where})"
        if dialect == "openai":
            return openai.error_response(400, message, "invalid_request_error", where)
        return _error(dialect, 400, message)

    @app.exception_handler(ErllamaError)
    async def refused(request: Request, exc: ErllamaError) -> JSONResponse:
        """The routes raise the one exception tree; the dialect of the route's module writes the envelope."""
        endpoint = getattr(request.scope.get("route"), "endpoint", None)
        return _MAP_ERROR.get(getattr(endpoint, "__module__", ""), openai.map_error)(exc)

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


class _Guard:
    """API key, body bound and request metrics, as plain ASGI middleware: a streamed reply's chunks go straight
    through (Starlette's BaseHTTPMiddleware would relay each one through a memory stream and a task switch)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/health") or path == "/metrics" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        dialect = _dialect(path)
        headers = Headers(scope=scope)
        cfg = self.state.config
        presented = _presented_key(headers) or ""
        if cfg.api_key is not None and not hmac.compare_digest(presented.encode(), cfg.api_key.encode()):
            await _error(dialect, 401, "Invalid or missing API key", "authentication_error")(scope, receive, send)
            return
        if cfg.api_key is None and not _host_allowed(headers.get("host"), cfg.allowed_hosts):
            message = (
                "this daemon has no API key, so it answers only requests addressed to an IP address, localhost or a"
                " name given with --allowed-host"
            )
            await _error(dialect, 403, message, "permission_error")(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            await _error(dialect, 413, f"Request body exceeds {cfg.max_body_bytes} bytes")(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            scope = _as_json(scope)
        t0 = time.perf_counter()
        status = 500
        received = 0
        notes = open_notes(headers.get(EXPLAIN_HEADER, "").strip().lower() in ("1", "true", "yes"))

        async def bounded_receive() -> Message:
            # A chunked body has no content-length: it is counted as it arrives, and refused once over the bound
            # (the route's body read fails with the 413, before the body is held in memory, parsed or rendered).
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cfg.max_body_bytes:
                    raise HTTPException(413, f"Request body exceeds {cfg.max_body_bytes} bytes")
            return message

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                value = notes.header()
                if value is not None:  # the first run's report: the response of a generating route
                    message = {**message, "headers": [*message.get("headers", []), (HEADER, value)]}
            await send(message)

        try:
            await self.app(scope, bounded_receive, send_status)
        finally:
            label = getattr(scope.get("route"), "path", "unmatched")
            metrics = self.state.metrics
            metrics.requests.labels(dialect, label, str(status)).inc()
            metrics.latency.labels(dialect, label).observe(time.perf_counter() - t0)


_GENERATING = {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/chat", "/api/generate"}
_STREAMS = {"openai": "text/event-stream", "anthropic": "text/event-stream", "ollama": "application/x-ndjson"}


def _document_errors(schema: dict[str, Any], keyed: bool) -> dict[str, Any]:
    """The statuses the server really sends (FastAPI documents a 422 it never sends, and none of the others), and
    the streamed form of the generating routes' 200 (SSE or NDJSON, not JSON)."""
    for path, ops in schema.get("paths", {}).items():
        dialect = _dialect(path)
        for method, op in ops.items():
            responses: dict[str, Any] = op.setdefault("responses", {})
            responses.pop("422", None)
            if method in ("post", "delete"):
                responses["400"] = {"description": "Malformed or invalid request (the dialect's error envelope)"}
                responses["413"] = {"description": "Request body over the configured bound"}
            if keyed:
                responses["401"] = {"description": "API key missing or wrong"}
            responses["403"] = {"description": "Host header not allowed (a daemon without an API key)"}
            if path in _GENERATING or path.startswith(("/v1/embeddings", "/api/embed", "/v1/messages/count")):
                responses["404"] = {"description": "No such model"}
                busy = {"openai": "429", "anthropic": "529", "ollama": "503"}.get(dialect, "503")
                responses[busy] = {"description": "Model busy: queue full or no slot in time (retry-after)"}
                responses["503"] = {"description": "Model failed or stopped (retry-after)"}
            if path in _GENERATING and "200" in responses:
                content = responses["200"].setdefault("content", {})
                content[_STREAMS.get(dialect, "text/event-stream")] = {"schema": {"type": "string"}}
    schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    return schema


def _as_json(scope: Scope) -> Scope:
    """Every body the API takes is JSON, whatever its ``Content-Type`` says: ``curl -d`` sends form encoding (as the
    Ollama docs' examples do) and other clients send none; Ollama and llama-server parse such bodies as JSON, and so
    does erllama (a body that is not JSON is still a 400)."""
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    kinds = [v for k, v in headers if k == b"content-type"]
    if len(kinds) == 1 and kinds[0].split(b";")[0].strip().lower().endswith((b"/json", b"+json")):
        return scope
    fixed = [(k, v) for k, v in headers if k != b"content-type"]
    fixed.append((b"content-type", b"application/json"))
    return {**scope, "headers": fixed}


def _host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a key-less daemon answers a request with this ``Host`` header. DNS rebinding, where a web page's
    own name is made to resolve to the daemon, always arrives under a name: IP literals, ``localhost`` and the
    configured names are safe, any other name is not."""
    if host is None:
        return True  # HTTP/1.0: no browser sends a request without one
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1 : name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in {a.lower() for a in allowed}:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _presented_key(headers: Headers) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")
