"""The HTTP protocol the daemon runs on: uvicorn's, with a deadline for a request's headers.

uvicorn closes a keep-alive connection that stays idle, but a connection that has sent part of a request line or
of its headers (a slowloris client) stays open for good: 100 half-sent requests held 100 connections. With
:func:`protocol_with_header_deadline` a connection whose next request's headers are not complete ``timeout_s``
after it opened, or after its last response, is closed. A request whose headers did arrive is never cut, however
long its body or its reply takes.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["protocol_with_header_deadline"]


def protocol_with_header_deadline(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class (httptools when installed, else h11) with the header deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools is a dependency; h11 is uvicorn's fallback
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class HeaderDeadline(Base):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._expire, self.cycle)

        def _expire(self, cycle_then: object) -> None:
            # the same cycle as when armed: no request's headers have completed since
            if self.cycle is cycle_then and self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{Base.__name__}"
    return HeaderDeadline
