"""``PrefixRouter``: Ray Serve's ``RequestRouter`` for the model deployment, placing each request on the replica
whose cache holds the longest token-exact prefix of its prompt (see :mod:`erllama.cluster.placement` for the
rule; this module only adapts it to Ray's interface). It runs inside the ingress, in the handle that calls the
replicas, and reads the replicas' reports from ``RunningReplica.routing_stats``."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from erllama.cache.index import RouteSummary
from erllama.cluster.placement import Candidate, Placement, PlacementConfig, Route

__all__ = ["PrefixRouter", "request_ended"]

_EMPTY = RouteSummary()
_MAX_UNROUTED = 10_000
_ROUTERS: weakref.WeakSet[PrefixRouter] = weakref.WeakSet()


def request_ended(ticket: str) -> None:
    """Tell this process's routers that the request with this ticket ended (called by the ingress before the
    client can see the end, so the conversation's next turn is placed knowing it; Ray's own completion callback
    may come later, and then changes nothing). Safe from any thread: the router's loop does the work."""
    for router in list(_ROUTERS):
        router.ended_soon(ticket)


class PrefixRouter(RequestRouter):
    """Token-exact prefix placement with a load guard; the power of two choices when a request says nothing.

    Not FIFO: with Ray's ``FIFOMixin`` a replica chosen for one request goes to the oldest waiting one, which
    would undo the placement; without it, Ray gives the chosen replica to the request it was chosen for."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._placement: Placement[ReplicaID] = Placement(PlacementConfig(**kwargs))
        self._in_flight: dict[ReplicaID, int] = {}
        self._routes: dict[str, Route] = {}  # internal request id -> its route, until it is routed
        self._tickets: dict[str, str] = {}  # internal request id -> the key of its ledger entry, until it ends
        self._loop: asyncio.AbstractEventLoop | None = None
        _ROUTERS.add(self)

    def ended_soon(self, ticket: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._placement.ended, ticket)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self._loop = asyncio.get_running_loop()
        route = _route_of(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        candidates = [self._candidate(r) for r in candidate_replicas]
        if pending_request is not None and route is not None:
            if len(self._routes) > _MAX_UNROUTED:  # requests cancelled before routing leave theirs behind
                self._routes.clear()
            self._routes[pending_request.metadata.internal_request_id] = route
        return [[by_id[i] for i in rank] for rank in self._placement.rank(route, candidates)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1
        request_id = pending_request.metadata.internal_request_id
        route = self._routes.pop(request_id, None)
        replica = self.curr_replicas.get(replica_id)
        if replica is not None:
            key = route.ticket if route is not None and route.ticket else request_id
            if len(self._tickets) > _MAX_UNROUTED:
                self._tickets.clear()
            self._tickets[request_id] = key
            self._placement.sent(key, route, self._candidate(replica))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._placement.ended(self._tickets.pop(internal_request_id, internal_request_id))
        left = self._in_flight.get(replica_id, 0) - 1
        if left > 0:
            self._in_flight[replica_id] = left
        else:
            self._in_flight.pop(replica_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._in_flight.pop(replica_id, None)
        self._placement.forget(replica_id)

    def _candidate(self, replica: RunningReplica) -> Candidate[ReplicaID]:
        stats = replica.routing_stats or {}
        summary = stats.get("summary")
        return Candidate(
            id=replica.replica_id,
            name=str(stats.get("name") or replica.replica_id.unique_id),
            summary=summary if isinstance(summary, RouteSummary) else _EMPTY,
            in_flight=self._load(replica),
        )

    def _load(self, replica: RunningReplica) -> int:
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        return max(self._in_flight.get(replica.replica_id, 0), queued or 0)


def _route_of(pending: PendingRequest | None) -> Route | None:
    if pending is None:
        return None
    route = pending.kwargs.get("route")
    return route if isinstance(route, Route) else None
