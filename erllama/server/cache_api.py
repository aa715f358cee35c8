"""``/erllama/v1/cache``: what the daemon's KV-state cache holds, and removing rows from it (``erllama cache``).

=======  ===============================  ==============================================================
method   path                             what
=======  ===============================  ==============================================================
GET      /erllama/v1/cache                rows, most recently used first (``?model=``, ``?limit=``)
GET      /erllama/v1/cache/stats          per tier: bytes, budget, rows, prompt tokens; hits in tokens
GET      /erllama/v1/cache/{key}          one row (a unique key prefix will do), with its token ids
DELETE   /erllama/v1/cache/{key}          remove one row from every tier
DELETE   /erllama/v1/cache                remove every row (``?model=``: those of one loaded model)
=======  ===============================  ==============================================================

Authenticated like every other route (the guard middleware). Rows of a loaded model are named by its served name
and show the first words of their text; rows of models not loaded show their file's fingerprint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query

from erllama.cache.key import Namespace
from erllama.cache.listing import find_key, row_record, stats_record
from erllama.cache.store import CacheStore
from erllama.errors import InvalidInputError, UnknownCacheRowError, UnknownModelError
from erllama.server.state import ServerState, StateDep

__all__ = ["router"]

router = APIRouter(prefix="/erllama/v1/cache", tags=["cache"])


def _store(state: ServerState) -> CacheStore:
    store = state.runtime.cache
    if store is None:
        raise InvalidInputError("this daemon runs without a cache")
    return store


def _names(state: ServerState) -> dict[Namespace, tuple[str, str]]:
    """Namespace -> (served name, model id) of each loaded model."""
    out: dict[Namespace, tuple[str, str]] = {}
    for name, (model_id, _) in state.loaded().items():
        try:
            namespace = state.runtime.cache_namespace(model_id)
        except UnknownModelError:  # unloaded meanwhile
            continue
        if namespace is not None:
            out.setdefault(namespace, (name, model_id))
    return out


def _detokenizer(state: ServerState, names: dict[Namespace, tuple[str, str]]) -> Callable[[Namespace], Any]:
    def for_namespace(namespace: Namespace) -> Callable[[Sequence[int]], str] | None:
        found = names.get(namespace)
        if found is None:
            return None
        model_id = found[1]
        return lambda tokens: state.runtime.detokenize(model_id, tokens)

    return for_namespace


def _listing(state: ServerState, model: str | None, limit: int) -> dict[str, Any]:
    store = _store(state)
    names = _names(state)
    rows = store.rows()
    if model is not None:
        wanted = {ns for ns, (name, _) in names.items() if name == model}
        if not wanted:
            raise UnknownModelError(f"no model named {model!r} is loaded")
        rows = [r for r in rows if r.meta.namespace in wanted]
    label = {ns: name for ns, (name, _) in names.items()}
    detok = _detokenizer(state, names)
    return {
        "rows": [row_record(r, names=label, detokenize=detok) for r in rows[:limit]],
        "count": len(rows),
        "bytes": sum(max(r.tiers.values(), default=0) for r in rows),
    }


@router.get("")
async def list_rows(
    state: StateDep,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
) -> Any:
    return await asyncio.to_thread(_listing, state, model, limit)


@router.get("/stats")
async def stats(state: StateDep) -> Any:
    return await asyncio.to_thread(lambda: stats_record(_store(state)))


def _one(state: ServerState, key: str) -> dict[str, Any]:
    store = _store(state)
    found = find_key(store.index.keys(), key)
    row = store.row(found)
    if row is None:
        raise UnknownCacheRowError(f"the row {found.hex()} was dropped meanwhile")
    names = _names(state)
    label = {ns: name for ns, (name, _) in names.items()}
    return row_record(row, names=label, detokenize=_detokenizer(state, names), preview=64, tokens=True)


@router.get("/{key}")
async def show(key: str, state: StateDep) -> Any:
    return await asyncio.to_thread(_one, state, key)


@router.delete("/{key}")
async def remove(key: str, state: StateDep) -> Any:
    store = _store(state)
    found = find_key(store.index.keys(), key)
    removed = await asyncio.to_thread(store.remove, found)
    return {"deleted": 1 if removed else 0, "key": found.hex()}


@router.delete("")
async def clear(state: StateDep, model: str | None = None) -> Any:
    store = _store(state)

    def work() -> int:
        if model is None:
            keys = store.index.keys()
        else:
            wanted = [ns for ns, (name, _) in _names(state).items() if name == model]
            if not wanted:
                raise UnknownModelError(f"no model named {model!r} is loaded")
            keys = [k for ns in wanted for k in store.index.keys(ns)]
        return sum(store.remove(k) for k in keys)

    return {"deleted": await asyncio.to_thread(work)}
