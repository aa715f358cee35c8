"""The prefix index: the longest stored row that is a prefix of a prompt, in one pass over the prompt.

Rows are registered along the key block chain (see :mod:`erllama.cache.key`). For every row of *n* tokens the index
counts, per chain link, how many rows run through it, and files the row under its **anchor**: the link after its
last full block, together with the length of its tail (``n % BLOCK_TOKENS``, 0..15 tokens).

A lookup walks the prompt's chain from the namespace root. At each link it asks the anchor table which tail lengths
are stored there and hashes just those tails of the prompt (at most 16 hashes, usually one or two), keeping the
longest hit; it moves to the next link only while some stored row runs through it. The work is bounded by the
prompt's length and never by the number of rows stored, and a prompt shorter than one block still hits rows of
its own length: there is no minimum.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from erllama.cache.key import (
    BLOCK_TOKENS,
    BlockHash,
    CacheKey,
    Namespace,
    anchor_key,
    block_chain,
    token_array,
)

__all__ = ["PrefixHit", "PrefixIndex", "RouteSummary", "link_ids"]


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A stored row whose tokens are the first ``n_tokens`` of the prompt."""

    key: CacheKey
    n_tokens: int


def _link_id(link: bytes) -> int:
    return int.from_bytes(link[:8], "little")


def link_ids(root: bytes, tokens: Sequence[int] | npt.NDArray[np.integer], chains: dict[bytes, list[int]]) -> list[int]:
    """The ids (first 8 bytes) of ``tokens``' chain links from ``root``, memoised in ``chains`` per root."""
    ids = chains.get(root)
    if ids is None:
        ids = chains[root] = [_link_id(link) for link in block_chain(root, tokens)]
    return ids


@dataclass(frozen=True, slots=True)
class RouteSummary:
    """A compact, token-exact picture of one cache for a router: the namespace roots its rows start from, the
    first 8 bytes of every chain link some row runs through, and the first 8 bytes of every row key.

    :meth:`shared_tokens` walks a prompt's block chain against it: the number of tokens (whole blocks) a stored
    row shares with the prompt, which the cache can restore instead of computing (a prefix hit, or a longer row
    cut back). Links are hashes of exact token blocks, so a match means equal tokens; 64-bit prefixes make a false
    match of one link about 2^-64, and it would only cost a routing choice, never a wrong restore (the cache
    itself compares full keys). Every namespace present counts (a router does not know which adapters a request
    will run with); a replica serves one model, so in practice there is one root, or one per adapter set.
    """

    roots: frozenset[bytes] = frozenset()
    links: frozenset[int] = frozenset()
    keys: frozenset[int] = frozenset()
    n_rows: int = 0

    def shared_tokens(self, tokens: Sequence[int] | npt.NDArray[np.integer], *, chains: dict[bytes, list[int]]) -> int:
        """Tokens of ``tokens`` some row of this cache shares with it (a multiple of ``BLOCK_TOKENS``).
        ``chains`` memoises the prompt's link ids per root across summaries (one hashing walk per root)."""
        best = 0
        for root in self.roots:
            depth = 0
            for link in link_ids(root, tokens, chains):
                if link not in self.links:
                    break
                depth += 1
            best = max(best, depth * BLOCK_TOKENS)
        return best

    def holds(self, key: CacheKey) -> bool:
        """Whether the cache holds (very likely) the row ``key``."""
        return _link_id(key) in self.keys


@dataclass(slots=True)
class _Row:
    links: list[bytes]  # root, then one link per full block
    n_tokens: int
    tokens: npt.NDArray[np.int32]


class PrefixIndex:
    """Longest-prefix lookup over stored rows of many namespaces. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[CacheKey, _Row] = {}
        self._through: dict[bytes, int] = {}  # link -> rows whose chain passes through it
        self._anchors: dict[bytes, dict[int, set[CacheKey]]] = {}  # link -> tail length -> keys
        self._version = 0  # moves with every add and remove: a summary of an unchanged index is reused
        self._summary: tuple[int, int, RouteSummary] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def add(self, namespace: Namespace | bytes, tokens: Sequence[int] | npt.NDArray[np.integer]) -> CacheKey:
        """Register a row; returns its key (adding the same row twice is a no-op)."""
        arr = token_array(tokens)
        root = namespace.digest() if isinstance(namespace, Namespace) else namespace
        links: list[bytes] = [root, *block_chain(root, arr)]
        n_full = (len(arr) // BLOCK_TOKENS) * BLOCK_TOKENS
        key = anchor_key(links[-1], arr[n_full:].tobytes())
        tail = len(arr) - n_full
        with self._lock:
            if key in self._rows:
                return key
            self._rows[key] = _Row(links=links, n_tokens=len(arr), tokens=arr.copy())
            self._version += 1
            for link in links:
                self._through[link] = self._through.get(link, 0) + 1
            self._anchors.setdefault(links[-1], {}).setdefault(tail, set()).add(key)
        return key

    def remove(self, key: CacheKey) -> bool:
        """Forget a row; False if it was not registered."""
        with self._lock:
            row = self._rows.pop(key, None)
            if row is None:
                return False
            self._version += 1
            for link in row.links:
                left = self._through[link] - 1
                if left:
                    self._through[link] = left
                else:
                    del self._through[link]
            anchor = row.links[-1]
            tails = self._anchors[anchor]
            tail = row.n_tokens % BLOCK_TOKENS
            tails[tail].discard(key)
            if not tails[tail]:
                del tails[tail]
            if not tails:
                del self._anchors[anchor]
            return True

    def summary(self, max_links: int = 1 << 16) -> RouteSummary:
        """A :class:`RouteSummary` of the rows, newest first until ``max_links`` links are taken (the same object
        again while no row came or went)."""
        roots: set[bytes] = set()
        links: set[int] = set()
        keys: set[int] = set()
        with self._lock:
            version = self._version
            if self._summary is not None and self._summary[:2] == (version, max_links):
                return self._summary[2]
            rows = list(self._rows.items())
        for key, row in reversed(rows):
            if len(links) >= max_links:
                break
            roots.add(row.links[0])
            links.update(_link_id(link) for link in row.links[1:])
            keys.add(_link_id(key))
        summary = RouteSummary(frozenset(roots), frozenset(links), frozenset(keys), len(rows))
        self._summary = (version, max_links, summary)
        return summary

    def keys(self, namespace: Namespace | bytes | None = None) -> list[CacheKey]:
        """The registered rows' keys (of one namespace, when given)."""
        root = namespace.digest() if isinstance(namespace, Namespace) else namespace
        with self._lock:
            return [k for k, row in self._rows.items() if root is None or row.links[0] == root]

    def n_tokens(self, key: CacheKey) -> int | None:
        row = self._rows.get(key)
        return None if row is None else row.n_tokens

    def longest_prefix(
        self,
        namespace: Namespace | bytes,
        tokens: Sequence[int] | npt.NDArray[np.integer],
        max_tokens: int | None = None,
        min_tokens: int = 1,
    ) -> PrefixHit | None:
        """The longest stored row that equals the first k tokens, ``min_tokens <= k <= max_tokens``.

        ``max_tokens`` defaults to the whole prompt (an exact hit); callers that must recompute the last prompt
        token pass ``len(tokens) - 1``.
        """
        arr = token_array(tokens)
        limit = len(arr) if max_tokens is None else min(max_tokens, len(arr))
        root = namespace.digest() if isinstance(namespace, Namespace) else namespace
        data = arr.tobytes()
        best: PrefixHit | None = None
        with self._lock:
            link: bytes = root
            if link not in self._through:
                return None
            chain = block_chain(root, arr[: (limit // BLOCK_TOKENS) * BLOCK_TOKENS])
            base = 0  # tokens covered by the full blocks up to `link`
            while True:
                for tail, keys in self._anchors.get(link, {}).items():
                    n = base + tail
                    if n > limit or n < min_tokens or (best is not None and n <= best.n_tokens):
                        continue
                    key = anchor_key(link, data[4 * base : 4 * n])
                    if key in keys:
                        best = PrefixHit(key=key, n_tokens=n)
                nxt: BlockHash | None = next(chain, None)
                if nxt is None or nxt not in self._through:
                    return best
                link = nxt
                base += BLOCK_TOKENS

    def deepest_shared(
        self,
        namespace: Namespace | bytes,
        tokens: Sequence[int] | npt.NDArray[np.integer],
        max_tokens: int | None = None,
    ) -> PrefixHit | None:
        """The stored row with the longest common prefix with ``tokens`` (capped at ``max_tokens``), among rows
        that share at least one whole block with it.

        Unlike :meth:`longest_prefix`, the row may be longer than what it shares (e.g. the same document followed
        by another question): ``n_tokens`` is the common length, and restoring the row then dropping its positions
        from ``n_tokens`` on gives the state of ``tokens[:n_tokens]``. The chain walk is one pass over the prompt;
        the rows through the deepest shared link are then compared token by token (a scan of the rows, so call this
        when the prefix lookup came up short).
        """
        arr = token_array(tokens)
        limit = len(arr) if max_tokens is None else min(max_tokens, len(arr))
        root = namespace.digest() if isinstance(namespace, Namespace) else namespace
        best: PrefixHit | None = None
        with self._lock:
            if root not in self._through:
                return None
            depth, deepest = 0, b""
            for d, link in enumerate(block_chain(root, arr[: (limit // BLOCK_TOKENS) * BLOCK_TOKENS]), start=1):
                if link not in self._through:
                    break
                depth, deepest = d, link
            if depth == 0:
                return None
            for key, row in self._rows.items():
                if len(row.links) > depth and row.links[depth] == deepest:
                    n = min(_common_prefix(row.tokens, arr), limit)
                    if best is None or n > best.n_tokens:
                        best = PrefixHit(key=key, n_tokens=n)
        return best

    def tokens_of(self, key: CacheKey) -> npt.NDArray[np.int32] | None:
        """The tokens of a row (a read-only view), or None when it is not registered."""
        row = self._rows.get(key)
        if row is None:
            return None
        view = row.tokens.view()
        view.flags.writeable = False
        return view

    def nearest(
        self, namespace: Namespace | bytes, tokens: Sequence[int] | npt.NDArray[np.integer], scan: int = 256
    ) -> PrefixHit | None:
        """The row sharing the longest common prefix with ``tokens`` (``n_tokens`` is that common length), to
        explain a miss: :meth:`deepest_shared` when a row shares a whole block, else the best of the ``scan`` most
        recent rows of the namespace compared on their first block (None when none shares a token)."""
        hit = self.deepest_shared(namespace, tokens)
        if hit is not None:
            return hit
        arr = token_array(tokens)[:BLOCK_TOKENS]
        root = namespace.digest() if isinstance(namespace, Namespace) else namespace
        best: PrefixHit | None = None
        with self._lock:
            if root not in self._through:
                return None
            for key in itertools.islice(reversed(self._rows), scan):
                row = self._rows[key]
                if row.links[0] != root:
                    continue
                n = _common_prefix(row.tokens[:BLOCK_TOKENS], arr)
                if n and (best is None or n > best.n_tokens):
                    best = PrefixHit(key=key, n_tokens=n)
        return best


def _common_prefix(a: npt.NDArray[np.int32], b: npt.NDArray[np.int32]) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m
