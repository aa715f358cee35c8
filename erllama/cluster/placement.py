"""Where a request should run: the pure decision of the cluster's router (no Ray in here, so it is tested alone).

Each replica reports a :class:`~erllama.cache.index.RouteSummary` of its cache (token-exact chain links) and the
router adds what it sent there itself since (a row is saved when its request ends; the next turn of a conversation
may arrive before the replica's next report). For every candidate the router estimates the work a request would
wait for and do there, in prompt tokens:

    cost(r) = (prompt tokens r's cache does not hold)
            + (prompt tokens r still has to compute for the requests the router sent it that have not ended)
            + tokens_per_request * (requests in flight on r)

and ranks candidates by it, cheapest first. The second term is the router's own ledger: each request it sends adds
the tokens it expected the replica to compute (what that replica did not hold then), and its end takes them off;
the third is the decode work of each request in flight, in prompt-token equivalents. A prompt the router sent
counts as held by its replica from the moment its request ends (its rows are saved then) until the replica's
reports include it: a request sharing a prefix still being computed would compute it as well. A replica holding
the prompt therefore wins while the prefills queued ahead of it cost less than computing the prompt elsewhere;
behind a long cold prefill, an idle replica becomes cheaper, and the prefix gets a second home.

A request no replica holds any block of is placed by load alone (the power of two choices, as Ray's default
router). Equal costs go to the replica the router itself ran most of the prompt on lately (with a shared disk
tier every replica holds what any of them saved, but the one that ran the conversation holds it in RAM), and are
otherwise broken at random. Two rules come before the cost:

* a request pinned to one replica (``x-erllama-replica``), or resuming a row by ``parent_key``, goes where that
  replica or row is, when it is a candidate;
* the load guard: when the cheapest replica has ``imbalance`` or more requests in flight beyond the least busy
  one, the request falls back to the power of two choices (two random candidates, Ray takes the shorter queue).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

import numpy as np

from erllama.cache.index import RouteSummary, link_ids
from erllama.cache.key import BLOCK_TOKENS as _BLOCK
from erllama.cache.key import CacheKey

__all__ = ["Candidate", "Placement", "PlacementConfig", "Route"]

R = TypeVar("R", bound=Hashable)


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """What the router knows of a request: its prompt's token ids (int32 little-endian bytes; empty when the
    ingress could not tell them), a ``parent_key`` it resumes, a replica it is pinned to, and a ticket naming it
    (the ingress tells the router when the request ended by it, before the client can see the end)."""

    tokens: bytes = b""
    parent_key: CacheKey | None = None
    pin: str | None = None
    ticket: str = ""

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // 4

    def token_ids(self) -> np.ndarray:
        return np.frombuffer(self.tokens, dtype="<i4")


@dataclasses.dataclass(frozen=True, slots=True)
class PlacementConfig:
    """``tokens_per_request``: what one request in flight costs the ones behind it besides its prefill (its decode
    steps), in prompt tokens;
    ``imbalance``: in-flight requests beyond the least busy replica at which the load guard takes over;
    ``recent_ttl_s``: how long a prompt whose request ended counts as cached where it ran without a report saying so
    (reports reach the router through Ray's controller, later than their period; 4 s measured worse than 120 s)."""

    tokens_per_request: int = 64
    imbalance: int = 8
    recent_ttl_s: float = 120.0


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate(Generic[R]):
    """One replica as the router sees it: its id, its name (what a pin names), its last report, its load."""

    id: R
    name: str
    summary: RouteSummary
    in_flight: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Open(Generic[R]):
    replica: R
    todo: int
    route: Route
    roots: frozenset[bytes]


class Placement(Generic[R]):
    """The router's memory (what it sent where) and its ranking. Not thread-safe: one router, one event loop."""

    def __init__(self, config: PlacementConfig | None = None, *, rng: random.Random | None = None) -> None:
        self.config = config or PlacementConfig()
        self._rng = rng or random.Random()
        self._recent: dict[R, dict[int, float]] = {}  # replica -> chain link id -> when a prompt through it was sent
        self._backlog: dict[R, int] = {}  # replica -> prompt tokens it must compute for requests still open
        self._open: dict[str, _Open[R]] = {}  # request id -> what it added to its replica's backlog

    def rank(self, route: Route | None, candidates: Sequence[Candidate[R]]) -> list[list[R]]:
        """Candidates in ranks, most preferred first (Ray tries a rank's members by queue length)."""
        if not candidates:
            return []
        if route is not None and route.pin:
            pinned = [c.id for c in candidates if c.name == route.pin or str(c.id) == route.pin]
            if pinned:
                return [pinned]
        by_load = sorted(candidates, key=lambda c: c.in_flight)
        if route is not None and route.parent_key is not None:
            holders = [c for c in by_load if c.summary.holds(route.parent_key)]
            if holders:
                return [[holders[0].id], [c.id for c in by_load if c is not holders[0]]]
        if route is None or not route.n_tokens:
            return self._two_choices(candidates)
        cost, held = self.costs(route, candidates)
        if not any(held.values()):  # nobody holds any of it: balance load alone
            return self._two_choices(candidates)
        ran = self._ran_here(route, candidates)
        order = {c.id: self._rng.random() for c in candidates}  # equal costs: no replica is always first
        ranked = sorted(candidates, key=lambda c: (cost[c.id], -ran[c.id], c.in_flight, order[c.id]))
        if ranked[0].in_flight - by_load[0].in_flight >= self.config.imbalance:
            return self._two_choices(candidates)
        return [[c.id] for c in ranked]

    def costs(self, route: Route, candidates: Sequence[Candidate[R]]) -> tuple[dict[R, int], dict[R, int]]:
        """The estimated cost of the request on each candidate, in prompt tokens (see the module's docstring), and
        the prompt tokens each holds."""
        tokens = route.token_ids()
        chains: dict[bytes, list[int]] = {}
        now = time.monotonic()
        roots = frozenset().union(*(c.summary.roots for c in candidates))
        cost: dict[R, int] = {}
        held: dict[R, int] = {}
        for c in candidates:
            n = c.summary.shared_tokens(tokens, chains=chains)
            recent = self._recent.get(c.id)
            if recent:
                n = max(n, self._recent_depth(recent, roots, tokens, chains, now))
            held[c.id] = n
            cost[c.id] = (
                max(0, len(tokens) - n) + self._backlog.get(c.id, 0) + self.config.tokens_per_request * c.in_flight
            )
        return cost, held

    def _ran_here(self, route: Route, candidates: Sequence[Candidate[R]]) -> dict[R, int]:
        """Per candidate, how much of the prompt the router itself recently ran there: among replicas that cost
        the same (a shared disk tier makes every replica hold what any of them saved), the one that ran the
        conversation has it in RAM, and stays its home."""
        tokens = route.token_ids()
        chains: dict[bytes, list[int]] = {}
        now = time.monotonic()
        roots = frozenset().union(*(c.summary.roots for c in candidates))
        return {
            c.id: self._recent_depth(recent, roots, tokens, chains, now) if (recent := self._recent.get(c.id)) else 0
            for c in candidates
        }

    def sent(self, request_id: str, route: Route | None, replica: Candidate[R]) -> None:
        """Remember that the request went to ``replica``: the tokens it must compute there join the replica's
        backlog until :meth:`ended`."""
        if route is None or not route.n_tokens:
            return
        _, held = self.costs(route, [replica])
        todo = max(0, route.n_tokens - held[replica.id])
        self._backlog[replica.id] = self._backlog.get(replica.id, 0) + todo
        self._open[request_id] = _Open(replica.id, todo, route, replica.summary.roots)
        if len(self._open) > _OPEN_MAX:  # ends the router never heard of: start the ledger again
            self._open.clear()
            self._backlog.clear()

    def ended(self, request_id: str) -> None:
        """The request ended (or failed): its tokens leave its replica's backlog, and its prompt counts as held
        there (its rows are saved as it ends) until the replica's reports say so themselves. Not before: a request
        with the same prefix sent while the first is still computing it would compute it too."""
        opened = self._open.pop(request_id, None)
        if opened is None:
            return
        left = self._backlog.get(opened.replica, 0) - opened.todo
        if left > 0:
            self._backlog[opened.replica] = left
        else:
            self._backlog.pop(opened.replica, None)
        now = time.monotonic()
        recent = self._recent.setdefault(opened.replica, {})
        chains: dict[bytes, list[int]] = {}
        for root in opened.roots:
            for link in link_ids(root, opened.route.token_ids(), chains):
                recent[link] = now
        self._expire(now)

    def backlog(self, replica: R) -> int:
        """Prompt tokens ``replica`` must still compute for the requests the router sent it (its ledger)."""
        return self._backlog.get(replica, 0)

    def forget(self, replica: R) -> None:
        """A replica died or left: what was sent there is gone with it."""
        self._recent.pop(replica, None)
        self._backlog.pop(replica, None)
        for request_id in [k for k, o in self._open.items() if o.replica == replica]:
            del self._open[request_id]

    def _recent_depth(
        self,
        recent: dict[int, float],
        roots: frozenset[bytes],
        tokens: np.ndarray,
        chains: dict[bytes, list[int]],
        now: float,
    ) -> int:
        best = 0
        for root in roots:
            depth = 0
            for link in link_ids(root, tokens, chains):
                when = recent.get(link)
                if when is None or now - when > self.config.recent_ttl_s:
                    break
                depth += 1
            best = max(best, depth)
        return best * _BLOCK

    def _expire(self, now: float) -> None:
        ttl = self.config.recent_ttl_s
        for recent in self._recent.values():
            if len(recent) > _EXPIRE_AT:
                for link in [k for k, t in recent.items() if now - t > ttl]:
                    del recent[link]
            if len(recent) > _RECENT_MAX:  # a flood within the TTL: the replicas' reports carry the truth anyway
                recent.clear()

    def _two_choices(self, candidates: Sequence[Candidate[R]]) -> list[list[R]]:
        pair = self._rng.sample(list(candidates), min(2, len(candidates)))
        return [[c.id for c in pair]]


_EXPIRE_AT = 4096  # links remembered per replica before expired ones are swept
_RECENT_MAX = 1 << 18  # links remembered per replica at most (~20 MB)
_OPEN_MAX = 1 << 16  # requests in the backlog ledger at most
