"""A loopback HTTP file server for pull tests: Range requests, ETags, and scripted misbehaviour."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@dataclasses.dataclass
class Served:
    """One file and how to misbehave while serving it."""

    body: bytes
    etag: str = '"v1"'
    drop_after: int | None = None
    """Close the connection after this many body bytes of a response (once per ``drops`` left)."""
    drops: int = 0
    fail_status: int | None = None
    """Answer requests with this status instead (``fail_times`` of them; all while it is None)."""
    fail_times: int | None = None
    retry_after: str | None = None
    delay_per_chunk_s: float = 0.0


@dataclasses.dataclass
class FileServer:
    url: str
    files: dict[str, Served]
    requests: list[dict[str, Any]]
    hub: dict[str, Any]
    """Fake Hub metadata: repo_id -> {path: paths-info record}."""


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        # the Hub's paths-info: POST /api/models/{owner}/{repo}/paths-info/{revision}
        self.server.record(self)
        parts = self.path.split("/")
        length = int(self.headers.get("content-length", "0"))
        form = self.rfile.read(length).decode()
        if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "paths-info":
            repo = f"{parts[3]}/{parts[4]}"
            from urllib.parse import parse_qs

            wanted = parse_qs(form).get("paths", [])
            infos = [self.server.fs.hub.get(repo, {}).get(p) for p in wanted]
            known = repo in self.server.fs.hub
            body = json.dumps([i for i in infos if i] if known else {"error": "Repository not found"}).encode()
            status = 200 if known else 404
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_error(404)

    def do_GET(self) -> None:
        self.server.record(self)
        path = self.path.split("?")[0]
        if "/resolve/" in path:  # the Hub's file URLs: /{owner}/{repo}/resolve/{revision}/{file}
            owner, repo, _, _rev, *rest = path.lstrip("/").split("/")
            path = f"/hub/{owner}/{repo}/{'/'.join(rest)}"
        served = self.server.fs.files.get(path)
        if served is None:
            self.send_error(404)
            return
        if served.fail_status is not None and served.fail_times != 0:
            if served.fail_times is not None:
                served.fail_times -= 1
            self.send_response(served.fail_status)
            if served.retry_after is not None:
                self.send_header("retry-after", served.retry_after)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body, start = served.body, 0
        rng = self.headers.get("range")
        if_range = self.headers.get("if-range")
        if rng and (if_range is None or if_range == served.etag):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("content-range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("content-range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("etag", served.etag)
        self.send_header("accept-ranges", "bytes")
        self.send_header("content-length", str(len(body) - start))
        self.end_headers()
        limit = len(body) - start
        if served.drops > 0 and served.drop_after is not None:
            served.drops -= 1
            limit = min(limit, served.drop_after)
        sent = 0
        while sent < limit:
            n = min(16384, limit - sent)
            self.wfile.write(body[start + sent : start + sent + n])
            sent += n
            if served.delay_per_chunk_s:
                self.wfile.flush()
                time.sleep(served.delay_per_chunk_s)
        if sent < len(body) - start:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    fs: FileServer

    def record(self, handler: _Handler) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.fs.requests.append({"method": handler.command, "path": handler.path, "headers": headers})


@contextmanager
def serve_files() -> Iterator[FileServer]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fs = FileServer(url=f"http://127.0.0.1:{server.server_address[1]}", files={}, requests=[], hub={})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.fs
    finally:
        server.shutdown()
        server.server_close()
