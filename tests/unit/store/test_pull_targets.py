"""Pulls never reach what the daemon must not fetch: link-local (cloud metadata) and, unless configured, private
addresses, on the first hop or any redirect."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from erllama.errors import RefusedSourceError
from erllama.store.download import check_target, download
from erllama.store.sources import resolve


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "https://169.254.169.254/x.gguf",
        "https://[fe80::1]/x.gguf",
        "https://[::ffff:169.254.169.254]/x.gguf",
        "https://10.0.0.5/x.gguf",
        "https://192.168.1.2/x.gguf",
        "https://172.16.0.1/x.gguf",
        "https://100.64.0.1/x.gguf",
        "https://[fc00::1]/x.gguf",
        "https://0.0.0.0/x.gguf",
        "https://224.0.0.1/x.gguf",
        "ftp://example.com/x.gguf",
    ],
)
def test_refused_targets(url: str) -> None:
    with pytest.raises(RefusedSourceError):
        check_target(url, allow_private=False)


def test_private_targets_are_allowed_by_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    check_target("https://10.0.0.5/x.gguf", allow_private=True)
    monkeypatch.setenv("ERLLAMA_PULL_ALLOW_PRIVATE", "1")
    check_target("https://192.168.1.2/x.gguf")
    with pytest.raises(RefusedSourceError):
        check_target("https://169.254.169.254/x.gguf")  # link-local never


def test_a_name_that_resolves_to_link_local_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(RefusedSourceError, match=r"169\.254\.169\.254"):
        resolve("https://models.example/x.gguf", allow_local=False)


def test_every_redirect_is_checked_before_it_is_sent(tmp_path: Path) -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(str(request.url))
        if request.url.host == "127.0.0.1":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data/"})
        return httpx.Response(200, content=b"secret")

    client = httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=True)
    with pytest.raises(RefusedSourceError, match=r"169\.254\.169\.254"):
        download("http://127.0.0.1:9/x.gguf", tmp_path / "x.partial", client=client)
    assert sent == ["http://127.0.0.1:9/x.gguf"], "the metadata URL was never requested"
    assert not (tmp_path / "x.partial").exists() or (tmp_path / "x.partial").read_bytes() == b""
