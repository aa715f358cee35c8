"""The ingress: the deployment behind Ray's HTTP proxy. It reads each request, finds the prompt's token ids (with
the model's vocabulary only; :mod:`erllama.cluster.prompts`), and forwards the request to a model replica through
a handle whose router places it (:mod:`erllama.cluster.router`), streaming the replica's response back unchanged.

Ray's proxy cannot do this itself: it routes before it has read the body. The ingress holds no model and no state
but the vocabulary; run as many as the proxy's traffic needs.

Faults: when the replica dies before the response's first body bytes (nothing was sent to the client: the status
and headers are held until then), the request is sent again, to another replica; after, the stream ends with an
error in the dialect's own form (an SSE ``error`` event, an Ollama ``{"error": ...}`` line) and the client sees a
clean end, not a hang.

(No ``from __future__ import annotations`` here: Ray Serve's class-based ingress hands FastAPI the methods'
annotations as they are, and FastAPI must see ``Request`` itself, not its name.)
"""

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from erllama.cluster.bridge import Forwarded, ResponseStart
from erllama.cluster.config import ClusterConfig
from erllama.cluster.placement import Route
from erllama.cluster.replica import REPLICA_HEADER, resolve_model
from erllama.cluster.router import request_ended

__all__ = ["Ingress"]

log = logging.getLogger("erllama.cluster")

_ATTEMPTS = 3
_MAX_BODY = 64 << 20  # read before routing; the replica's own limit (ServerConfig.max_body_bytes) answers below it
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
_REPLICA_GONE = (RayActorError, RayTaskError, ConnectionError)


async def _body(first: bytes | None, stream: Any, path: str, ticket: str, length: int | None) -> AsyncIterator[bytes]:
    """The response body; the router hears that the request ended before the client can see the end (before the
    last ``content-length`` byte goes out, or before a chunked body's terminating chunk)."""
    if first is None:  # the response had no body
        request_ended(ticket)
        return
    finished = False
    sent = 0
    try:
        async for chunk in _chain(first, stream):
            sent += len(chunk)
            if length is not None and sent >= length:
                request_ended(ticket)
            yield chunk
        request_ended(ticket)
        finished = True
    except _REPLICA_GONE as exc:
        log.warning("a replica died while streaming %s: %s", path, exc)
        request_ended(ticket)
        yield _stream_error(path, "the replica serving this request failed; send it again")
        finished = True
    finally:
        if not finished:
            stream.cancel()  # the client went away: the replica's app sees a disconnect and stops generating


async def _chain(first: bytes, stream: Any) -> AsyncIterator[bytes]:
    yield first
    async for chunk in stream:
        yield chunk


def _content_length(headers: tuple[tuple[bytes, bytes], ...]) -> int | None:
    for k, v in headers:
        if k.lower() == b"content-length" and v.isdigit():
            return int(v)
    return None


def _stream_error(path: str, message: str) -> bytes:
    """The dialect's own mid-stream error."""
    if path.startswith("/v1/messages"):
        event = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"event: error\ndata: {json.dumps(event)}\n\n".encode()
    if path.startswith("/api/"):
        return (json.dumps({"error": message}) + "\n").encode()
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': 503}})}\n\n".encode()


async def _read_body(request: Request) -> bytes | None:
    """The whole body, or None past ``_MAX_BODY`` (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _MAX_BODY:
        return None
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > _MAX_BODY:
            return None
        parts.append(part)
    return b"".join(parts)


def _error(path: str, status: int, message: str) -> JSONResponse:
    """An error in the dialect's own envelope (503 is Anthropic's 529, overloaded)."""
    if path.startswith("/v1/messages"):
        kind = {413: "request_too_large", 503: "overloaded_error"}.get(status, "api_error")
        return JSONResponse(
            {"type": "error", "error": {"type": kind, "message": message}}, 529 if status == 503 else status
        )
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


# Helpers above the class: Ray pickles the ingress class by value, with only the globals defined before it.
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    def __init__(self, replicas: DeploymentHandle[Any], config: ClusterConfig) -> None:
        from erllama.cluster.prompts import RoutingPrompts, VocabModel

        self._replicas = replicas.options(stream=True)
        self._route = config.router == "prefix"
        self._prompts: RoutingPrompts | None = None
        if self._route:
            _, path = resolve_model(config.model)
            self._prompts = RoutingPrompts(VocabModel(path))

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(self, path: str, request: Request) -> Response:
        body = await _read_body(request)
        if body is None:
            return _error("/" + path, 413, f"the request body is larger than {_MAX_BODY >> 20} MiB")
        route = await self._route_of("/" + path, request, body)
        # the replica's app is reached only through here: it answers to "localhost"
        headers = (*((k, v) for k, v in request.headers.raw if k.lower() != b"host"), (b"host", b"localhost"))
        forwarded = Forwarded(
            method=request.method,
            path="/" + path,
            query=request.url.query.encode("latin-1"),
            headers=headers,
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
        )
        failure: BaseException | None = None
        for _ in range(_ATTEMPTS):
            stream: DeploymentResponseGenerator[Any] = self._replicas.forward.remote(forwarded, route=route)  # type: ignore[assignment]  # stream=True
            try:  # held until the body's first bytes: until then nothing was sent, and another replica may take it
                start = await stream.__anext__()
                first: bytes | None = await anext(stream, None)
            except StopAsyncIteration:
                return Response(status_code=502)
            except _REPLICA_GONE as exc:
                failure = exc
                log.warning("a replica failed before answering %s /%s; sending it again: %s", request.method, path, exc)
                await asyncio.sleep(0.1)
                continue
            assert isinstance(start, ResponseStart)
            length = _content_length(start.headers)
            ticket = route.ticket if route is not None else ""
            response = StreamingResponse(_body(first, stream, "/" + path, ticket, length), status_code=start.status)
            response.raw_headers = [(k, v) for k, v in start.headers if k.lower() not in _HOP_BY_HOP]
            return response
        return _error("/" + path, 503, f"no replica could take the request: {failure}")

    async def _route_of(self, path: str, request: Request, body: bytes) -> Route | None:
        pin = request.headers.get(REPLICA_HEADER)
        if self._prompts is None:
            return Route(pin=pin) if pin else None
        tokens = await asyncio.to_thread(self._prompts.tokens, path, body) if request.method == "POST" else None
        data = np.asarray(tokens, dtype="<i4").tobytes() if tokens else b""
        return Route(tokens=data, pin=pin, ticket=uuid.uuid4().hex)
