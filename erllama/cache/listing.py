"""What ``erllama cache ls | show | rm | stats`` and ``/erllama/v1/cache`` show of a cache: rows as plain records.

A record is JSON-ready: the row's key (hex), the model it belongs to, its length in tokens, the bytes it takes in
each tier holding it, why it was saved, when, how often requests restored it, and the first words of its text
(when a tokenizer for its model is at hand). Keys may be abbreviated to a unique prefix, as git's are.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from erllama.cache.key import CacheKey, Namespace
from erllama.cache.kvc import read_meta
from erllama.cache.store import CacheStore, RowInfo
from erllama.errors import CorruptCacheFileError, UnknownCacheRowError

__all__ = ["PREVIEW_TOKENS", "DirRow", "find_key", "read_dir", "row_record", "stats_record"]

PREVIEW_TOKENS = 24  # tokens of a row's text shown in a listing

Detokenize = Callable[[Sequence[int]], str]


def model_label(namespace: Namespace, names: Mapping[Namespace, str]) -> str:
    """The served name of the model a row belongs to, else its fingerprint's start and quantisation."""
    name = names.get(namespace)
    if name is not None:
        return name
    label = f"{namespace.model_fingerprint[:12]} {namespace.quantization}"
    return f"{label} +adapters" if namespace.adapters else label


def row_record(
    info: RowInfo,
    *,
    names: Mapping[Namespace, str],
    detokenize: Callable[[Namespace], Detokenize | None] = lambda _ns: None,
    preview: int = PREVIEW_TOKENS,
    tokens: bool = False,
) -> dict[str, Any]:
    """One row as a record; ``detokenize(namespace)`` gives the text of its tokens where a tokenizer is at hand;
    ``tokens``: also list its token ids."""
    meta = info.meta
    now = time.time_ns()
    text = None
    detok = detokenize(meta.namespace)
    if detok is not None and preview > 0:
        head = detok(meta.tokens[:preview])
        text = head + ("…" if meta.n_tokens > preview else "")
    record: dict[str, Any] = {
        "key": meta.key.hex(),
        "model": model_label(meta.namespace, names),
        "tokens": meta.n_tokens,
        "bytes": max(info.tiers.values(), default=0),
        "tiers": dict(info.tiers),
        "reason": meta.save_reason.name.lower(),
        "created": meta.created_ns / 1e9,
        "age_s": round(max(0, now - meta.created_ns) / 1e9, 1),
        "hits": info.hits,
        "last_hit_s": round(max(0, now - info.last_used_ns) / 1e9, 1) if info.last_used_ns else None,
        "text": text,
    }
    if tokens:
        record["token_ids"] = list(meta.tokens)
    return record


def find_key(keys: Iterable[CacheKey], prefix: str) -> CacheKey:
    """The one key whose hex starts with ``prefix`` (at least 4 hex digits)."""
    want = prefix.strip().lower()
    if len(want) < 4 or any(c not in "0123456789abcdef" for c in want):
        raise UnknownCacheRowError(f"{prefix!r} is not a cache key: give at least 4 of its hex digits")
    found = [k for k in keys if k.hex().startswith(want)]
    if not found:
        raise UnknownCacheRowError(f"no cached row has a key starting with {want}")
    if len(found) > 1:
        raise UnknownCacheRowError(f"{len(found)} cached rows have keys starting with {want}: give more digits")
    return found[0]


def stats_record(store: CacheStore) -> dict[str, Any]:
    """Per tier its bytes, budget, rows and prompt tokens held; the counters (hits and queries in tokens too)."""
    counters = store.counters.snapshot()
    tokens = store.tier_tokens()
    tiers = {
        t.name: {"bytes": t.used_bytes, "budget_bytes": t.budget_bytes, "rows": len(t), "tokens": tokens[t.name]}
        for t in store.tiers
    }
    queried = counters.get("query_tokens", 0)
    restored = counters.get("restored_tokens", 0)
    return {
        "tiers": tiers,
        "rows": len(store.index),
        "query_tokens": queried,
        "restored_tokens": restored,
        "restored_share": round(restored / queried, 4) if queried else None,
        "restored_tokens_by_tier": {t.name: counters.get(f"{t.name}_restored_tokens", 0) for t in store.tiers},
        "counters": counters,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class DirRow:
    """A row file of a kv directory read without a daemon: its record's source and where it lies."""

    info: RowInfo
    path: Path


def read_dir(root: str | os.PathLike[str], tier: str = "disk") -> tuple[list[DirRow], list[Path]]:
    """The rows of a file tier's directory, read from their headers only (nothing is changed: no scan cleanup, no
    eviction), most recently used first; and the files that are not readable rows."""
    rows: list[DirRow] = []
    bad: list[Path] = []
    base = Path(root)
    try:
        fans = [e for e in os.scandir(base) if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return rows, bad
    for fan in fans:
        for entry in os.scandir(fan.path):
            if not entry.name.endswith(".kvc"):
                continue
            path = Path(entry.path)
            try:
                meta, size = read_meta(path)
            except (OSError, CorruptCacheFileError):
                bad.append(path)
                continue
            rows.append(DirRow(RowInfo(meta, {tier: size}, meta.hit_count, meta.last_used_ns), path))
    rows.sort(key=lambda r: max(r.info.last_used_ns, r.info.meta.created_ns), reverse=True)
    return rows, bad
