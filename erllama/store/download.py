"""Resumable HTTP downloads into a ``.partial`` file.

The partial file lives in the store's ``incoming/`` directory and is never visible as a model. A download that
drops (a reset connection, a timeout, a truncated body) is retried from where it stopped with a ``Range`` request;
the ``If-Range`` validator (the ETag, else Last-Modified, kept beside the partial) makes a server that changed the
file send all of it again instead of a tail that does not match. A pull that gives up leaves the partial for the
next pull of the same file to continue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import socket
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from erllama.errors import DownloadError, RefusedSourceError

__all__ = ["ProgressFn", "Retries", "download"]

ProgressFn = Callable[[int, int | None], None]
"""``progress(completed_bytes, total_bytes_or_None)``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Retries:
    """How a download retries.

    Attributes:
        attempts: failures in a row without new bytes before it gives up.
        backoff_s: the first wait before a retry; it doubles with each failure in a row (a ``Retry-After`` may ask
            for longer).
        max_wait_s: the longest wait between two tries.
    """

    attempts: int = 4
    backoff_s: float = 0.25
    max_wait_s: float = 30.0


# statuses that say "not now" rather than "no": retried like a dropped connection
_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})


class _Transient(Exception):  # control flow inside download(); never escapes it
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code} {response.reason_phrase}")
        value = response.headers.get("retry-after", "")
        self.retry_after: float | None = float(value) if value.isdigit() else None


def _validator(response: httpx.Response) -> str | None:
    etag: str | None = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = response.headers.get("last-modified")
    return modified


def _total(response: httpx.Response, start: int) -> int | None:
    if response.status_code == 206:
        # Content-Range: bytes START-END/TOTAL
        _, _, total = response.headers.get("content-range", "").rpartition("/")
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(url: str, *, allow_private: bool | None = None) -> None:
    """Refuse a URL the daemon must not fetch, first hop or redirect alike: another scheme than https (plain http
    only on loopback), credentials, and any host whose addresses include a link-local (cloud metadata services
    live at 169.254.169.254), multicast, unspecified or reserved one, or a private one (10/8, 172.16/12,
    192.168/16, fc00::/7, 100.64/10) unless ``allow_private`` (default: ``ERLLAMA_PULL_ALLOW_PRIVATE=1``).
    Loopback stays allowed (a local mirror). Raises RefusedSourceError."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if not host:
        raise RefusedSourceError(f"{url!r} has no host")
    if parts.username or parts.password:
        raise RefusedSourceError("credentials in URLs are refused (they would be stored in the manifest)")
    if parts.scheme not in ("https", "http") or (parts.scheme == "http" and not is_loopback(host)):
        raise RefusedSourceError(
            f"plain http:// is refused for {host}: use https:// (http only on loopback)"
            if parts.scheme == "http"
            else f"{parts.scheme}:// is refused: use https://"
        )
    if allow_private is None:
        allow_private = os.environ.get("ERLLAMA_PULL_ALLOW_PRIVATE", "") == "1"
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return  # does not resolve: the connection fails on its own
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    for found in addresses:
        mapped = found.ipv4_mapped if isinstance(found, ipaddress.IPv6Address) else None
        addr = mapped or found
        if addr.is_loopback:
            continue
        if addr.is_link_local or addr.is_multicast or addr.is_unspecified or addr.is_reserved:
            raise RefusedSourceError(f"{host} resolves to {addr}, an address pulls never fetch from")
        if (addr.is_private or addr in _SHARED) and not allow_private:
            raise RefusedSourceError(
                f"{host} resolves to the private address {addr}: refused (ERLLAMA_PULL_ALLOW_PRIVATE=1 allows it)"
            )


_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not is_private in every Python version


def _check_hop(request: httpx.Request) -> None:
    check_target(str(request.url))


def download(
    url: str,
    partial: Path,
    *,
    headers: Mapping[str, str] | None = None,
    progress: ProgressFn | None = None,
    retries: Retries = Retries(),
    timeout_s: float = 30.0,
    client: httpx.Client | None = None,
) -> int:
    """Fetch ``url`` into ``partial``, continuing what an earlier attempt left there; returns the file's size.

    A dropped connection, a timeout or a "not now" status (408, 429, 5xx but 501/505) is retried, resuming, with a
    doubling wait (at least what ``Retry-After`` asks, at most ``retries.max_wait_s``); ``retries.attempts``
    failures in a row without new bytes give up.

    Raises:
        DownloadError: the server refused (another 4xx), or the transfer failed ``retries.attempts`` times in a row
            without progress. The partial file is kept for a later call to continue.
    """
    meta_path = partial.with_name(partial.name + ".json")
    own = client is None
    http = client or httpx.Client(follow_redirects=True, timeout=timeout_s)
    if _check_hop not in http.event_hooks["request"]:  # every hop, redirects included, is checked before it is sent
        http.event_hooks["request"] = [*http.event_hooks["request"], _check_hop]
    failures = 0
    try:
        while True:
            start = partial.stat().st_size if partial.exists() else 0
            validator = _read_validator(meta_path, url) if start else None
            req = {**(headers or {}), "Accept-Encoding": "identity"}  # byte ranges of the file itself
            if start and validator:
                req["Range"] = f"bytes={start}-"
                req["If-Range"] = validator
            elif start:
                start = 0  # nothing to check the old bytes against: start over
            got_before = start
            try:
                with http.stream("GET", url, headers=req) as response:
                    if response.status_code == 416 and start:  # nothing left to send: the partial is whole
                        return start
                    if response.status_code in _TRANSIENT:
                        raise _Transient(response)
                    if response.status_code not in (200, 206):
                        raise DownloadError(f"GET {url}: HTTP {response.status_code} {response.reason_phrase}")
                    if response.status_code == 200:
                        start = 0
                    total = _total(response, start)
                    _write_validator(meta_path, url, _validator(response))
                    with partial.open("r+b" if start else "wb") as out:
                        out.seek(start)
                        out.truncate()
                        done = start
                        if progress:
                            progress(done, total)
                        for chunk in response.iter_bytes():  # as received: a drop loses nothing written
                            out.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done, total)
                    if total is not None and done != total:
                        raise httpx.RemoteProtocolError(f"body ended at {done} of {total} bytes")
                    meta_path.unlink(missing_ok=True)
                    return done
            except (httpx.TransportError, _Transient) as exc:  # dropped, reset, timed out, busy: resume
                now = partial.stat().st_size if partial.exists() else 0
                failures = 0 if now > got_before else failures + 1
                if failures >= retries.attempts:
                    raise DownloadError(
                        f"GET {url} failed {retries.attempts} times in a row ({exc}); {now} bytes kept, "
                        "pull again to continue"
                    ) from exc
                wait = retries.backoff_s * 2**failures
                if isinstance(exc, _Transient) and exc.retry_after is not None:
                    wait = max(wait, exc.retry_after)
                time.sleep(min(wait, retries.max_wait_s))
    finally:
        if own:
            http.close()


def _read_validator(meta_path: Path, url: str) -> str | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        meta = json.loads(meta_path.read_text())
        if meta.get("url") == url and isinstance(meta.get("validator"), str):
            return str(meta["validator"])
    return None


def _write_validator(meta_path: Path, url: str, validator: str | None) -> None:
    if validator:
        meta_path.write_text(json.dumps({"url": url, "validator": validator}))
    else:
        meta_path.unlink(missing_ok=True)
