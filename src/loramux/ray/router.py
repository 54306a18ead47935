"""``AdapterAffinityRouter``: Ray Serve's request-router API driven by the pure policy in ``routing.py``.

It runs inside the caller of the replicas' DeploymentHandle (the ingress), one instance per
handle. What it knows per replica: the requests it has routed there and not seen finish (exact for
this router), the adapters the replica reports holding (Ray's multiplexing report:
``RunningReplica.multiplexed_model_ids``, pushed ~0.1 s after the replica first serves an adapter)
and, to bridge that delay, its own LRU record of where it sent each adapter (``Residency``).

``FIFOMixin`` is deliberately not mixed in: it may hand the replica chosen for one request to the
oldest pending request, whatever its adapter. Without it Ray fulfils exactly the request whose
ranks were computed.
"""
from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from typing import Any, List, Optional

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .routing import DEFAULT_BALANCE, DEFAULT_SLACK, ReplicaState, Residency, rank_replicas

logger = logging.getLogger(__name__)
# the routers of this process (the ingress's handle has one), so that its /replicas view can leave out
# replicas Ray has replaced; process-wide because Ray, not loramux, constructs them
_ROUTERS: "weakref.WeakSet[AdapterAffinityRouter]" = weakref.WeakSet()


def live_replica_ids() -> set[str] | None:
    """Unique ids of the replicas the routers in this process route to now; None if there is no router yet."""
    routers = list(_ROUTERS)
    if not routers:
        return None
    return {rid.unique_id for router in routers for rid in list(router.curr_replicas)}


class AdapterAffinityRouter(MultiplexMixin, RequestRouter):
    """Ranks replicas with ``routing.rank_replicas``; Ray then picks, rank by rank, one whose queue is not full."""

    def initialize_state(self, capacity: int = 32, balance: float = DEFAULT_BALANCE, slack: float = DEFAULT_SLACK,
                         **_: Any) -> None:
        self._residency = Residency(capacity)
        self._balance, self._slack = balance, slack
        self._in_flight: dict[ReplicaID, int] = defaultdict(int)
        self._sent: dict[str, ReplicaID] = {}  # internal request id -> replica, until it completes
        _ROUTERS.add(self)

    def _state(self) -> None:  # initialize_state is not called when request_router_kwargs is empty
        if not hasattr(self, "_residency"):
            self.initialize_state()

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        self._state()
        if pending_request is not None:
            # without this Ray retries at once, in a busy loop, when every ranked replica is full
            pending_request.routing_context.should_backoff = True
        adapter = (pending_request.metadata.multiplexed_model_id or None) if pending_request is not None else None
        live = {r.replica_id: r for r in candidate_replicas}
        states = []
        for rid, replica in live.items():
            reported = replica.multiplexed_model_ids
            holds = adapter is not None and (adapter in reported or self._residency.holds(rid, adapter))
            states.append(ReplicaState(id=rid, in_flight=self._in_flight.get(rid, 0), holds=holds))
        ranks = rank_replicas(adapter, states, balance=self._balance, slack=self._slack)
        return [[live[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._state()
        self._in_flight[replica_id] += 1
        self._sent[pending_request.metadata.internal_request_id] = replica_id
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            self._residency.touch(replica_id, adapter)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._state()
        if self._sent.pop(internal_request_id, None) is not None and self._in_flight.get(replica_id, 0) > 0:
            self._in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._state()
        self._residency.forget_replica(replica_id)
        self._in_flight.pop(replica_id, None)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._state()
        self._residency.retain(r.replica_id for r in replicas)
