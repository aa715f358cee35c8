"""The CLI's client of a running daemon (``erllama serve``), over its Ollama-dialect and health endpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from erllama.errors import (
    DaemonUnavailableError,
    ErllamaError,
    InvalidInputError,
    UnknownCacheRowError,
    UnknownModelError,
)

__all__ = ["DEFAULT_HOST", "Daemon"]

DEFAULT_HOST = "http://127.0.0.1:8000"


class Daemon:
    """A daemon at ``host`` (``$ERLLAMA_HOST``, default ``http://127.0.0.1:8000``)."""

    def __init__(self, host: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.host = host if "://" in host else f"http://{host}"
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.host, headers=headers, timeout=httpx.Timeout(timeout_s, connect=2.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> bool:
        """Whether a daemon answers (within a short timeout)."""
        try:
            return self._http.get("/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise DaemonUnavailableError(
                f"no erllama daemon at {self.host} ({exc}); start one with `erllama serve`"
            ) from exc
        _raise_for(response)
        return response.json() if response.content else {}

    def ps(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/ps")["models"])

    def metrics(self) -> str:
        try:
            response = self._http.get("/metrics")
        except httpx.HTTPError as exc:
            raise DaemonUnavailableError(f"no erllama daemon at {self.host} ({exc})") from exc
        _raise_for(response)
        return response.text

    def stop(self, model: str) -> bool:
        """Unload ``model``; False when it was not loaded."""
        loaded = {m["name"] for m in self.ps()}
        names = {model, model if ":" in model else f"{model}:latest"}
        hit = [n for n in loaded if n in names or n.split(":")[0] == model]
        for name in hit:
            self._call("POST", "/api/generate", {"model": name, "prompt": "", "keep_alive": 0, "stream": False})
        return bool(hit)

    def knows(self, model: str) -> bool:
        """Whether the daemon serves or can load ``model`` (its /api/tags, a bare name meaning its ``:latest``)."""
        names = {m["name"] for m in self._call("GET", "/api/tags").get("models", [])}
        return bool({model, f"{model}:latest"} & names) or any(n.split(":")[0] == model for n in names)

    def pull(self, model: str) -> Iterator[dict[str, Any]]:
        """Have the daemon pull ``model`` into its store; its progress records."""
        return self._stream("/api/pull", {"model": model})

    def delete(self, model: str) -> None:
        self._call("DELETE", "/api/delete", {"model": model})

    # -- the KV-state cache (/erllama/v1/cache) ----------------------------------------------------------------

    def cache_rows(self, model: str | None = None, limit: int = 100) -> dict[str, Any]:
        query = f"?limit={limit}" + (f"&model={quote(model)}" if model else "")
        return dict(self._call("GET", f"/erllama/v1/cache{query}"))

    def cache_row(self, key: str) -> dict[str, Any]:
        try:
            return dict(self._call("GET", f"/erllama/v1/cache/{quote(key)}"))
        except UnknownModelError as exc:  # the 404 of a key that names no row
            raise UnknownCacheRowError(str(exc)) from None

    def cache_remove(self, key: str) -> dict[str, Any]:
        try:
            return dict(self._call("DELETE", f"/erllama/v1/cache/{quote(key)}"))
        except UnknownModelError as exc:
            raise UnknownCacheRowError(str(exc)) from None

    def cache_clear(self, model: str | None = None) -> int:
        query = f"?model={quote(model)}" if model else ""
        return int(self._call("DELETE", f"/erllama/v1/cache{query}")["deleted"])

    def cache_stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/erllama/v1/cache/stats"))

    def chat(
        self, model: str, messages: list[dict[str, str]], options: Mapping[str, Any], *, explain: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Stream ``/api/chat`` records; with ``explain`` the final one's ``cache`` says why no more was cached."""
        body = {"model": model, "messages": messages, "stream": True, "options": dict(options)}
        return self._stream("/api/chat", body, headers={"x-erllama-explain": "1"} if explain else None)

    def _stream(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """POST ``body`` and yield the NDJSON records of the reply (the request starts at the first ``next``)."""
        try:
            with self._http.stream("POST", path, json=body, headers=headers) as response:
                if response.status_code != 200:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    if line.strip():
                        record = json.loads(line)
                        if "error" in record:
                            raise ErllamaError(str(record["error"]))
                        yield record
        except httpx.HTTPError as exc:
            raise DaemonUnavailableError(f"the daemon at {self.host} went away ({exc})") from exc


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error", response.text)
        message = str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        message = response.text
    if response.status_code == 404:
        raise UnknownModelError(message)
    if response.status_code in (400, 401, 403, 413, 422):
        raise InvalidInputError(f"{response.status_code}: {message}")
    raise ErllamaError(f"the daemon answered {response.status_code}: {message}")
