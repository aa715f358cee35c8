"""An HTTP request carried over Ray to a replica and run through its ASGI app (the same app ``erllama serve``
runs), its response carried back as a stream: a :class:`ResponseStart`, then body chunks as the app sends them.

The app sees a complete request (the body was read by the ingress); when the caller stops reading (the client went
away, or the ingress was cancelled) the app's next ``receive()`` says ``http.disconnect``, which the server's routes
already turn into a cancelled generation. :class:`Lifespan` runs the app's startup and shutdown (the server's
keep-alive reaper, its shutdown saves) as uvicorn would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

from starlette.types import ASGIApp, Message

__all__ = ["Forwarded", "Lifespan", "ResponseStart", "run_request"]


@dataclasses.dataclass(frozen=True, slots=True)
class Forwarded:
    """An HTTP request as the ingress read it."""

    method: str
    path: str
    query: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseStart:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]


async def run_request(
    app: ASGIApp, request: Forwarded, *, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> AsyncGenerator[ResponseStart | bytes, None]:
    """Run ``request`` through ``app``; yields the response's start (with ``extra_headers`` added), then its
    body chunks. Closing the iterator early disconnects the request inside the app and waits for the app to end."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("latin-1"),
        "query_string": request.query,
        "root_path": "",
        "headers": list(request.headers),
        "client": request.client,
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent: asyncio.Queue[Message] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    task: asyncio.Task[None] = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                if sent.empty():
                    task.result()  # the app's own exception, if it raised one
                    return  # it ended without finishing its response (nothing more will come)
                continue
            message = getter.result()
            if message["type"] == "http.response.start":
                headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ()))
                yield ResponseStart(int(message["status"]), headers + extra_headers)
            elif message["type"] == "http.response.body":
                chunk = bytes(message.get("body", b""))
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        # the app ends on its own (its response was complete, or it saw the disconnect); an error it raised after
        # answering (a 500 it had already sent) was logged by the server's middleware
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), 30.0)


class Lifespan:
    """The ASGI lifespan of an app run without a server: :meth:`start` runs its startup, :meth:`stop` its
    shutdown."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def receive() -> Message:
            return await self._to_app.get()

        async def send(message: Message) -> None:
            await self._from_app.put(message)

        self._task = asyncio.ensure_future(self._app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._from_app.get()
        if reply["type"] != "lifespan.startup.complete":
            with contextlib.suppress(Exception):
                await self._task
            raise RuntimeError(f"the app's startup failed: {reply.get('message', reply['type'])}")

    async def stop(self) -> None:
        if self._task is None:
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._from_app.get(), 60.0)
        self._task = None
