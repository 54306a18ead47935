"""Adapter-affinity routing as pure functions: which replica should serve a request for adapter X.

No Ray here (the simulation in ``benchmarks/sim_routing.py`` runs these same functions for a
thousand replicas): ``router.py`` feeds them Ray's live view, the simulation feeds them its own.

The policy is *consistent hashing with bounded loads* (Mirrokni, Thorup, Zadimoghaddam 2018) over
what each replica holds. A replica is under the bound while its in-flight count is below
``balance * (total_in_flight + 1) / n + slack``. Ranks, most preferred first:

1. replicas that already hold the adapter and are under the bound (least loaded first);
2. otherwise the adapter's *home*: the replicas under the bound in the order of the rendezvous hash
   of (adapter, replica). The order is stable, so an adapter evicted everywhere comes back to the
   same replica, each replica's cache holds its own share of the catalogue even when the catalogue
   is larger than the fleet's capacity, and routers that never talk to each other agree;
3. then every other replica (over the bound) by load. Ray tries ranks in order and skips replicas
   whose queue is full, so a request is never stuck behind rank 1.

Step 2 is also how a hot adapter gets more than one replica: when all its holders are over the
bound the next request lands on the next replica in its hash order, which then holds it too; the
number of holders grows with the adapter's share of the traffic and shrinks again as cold copies
are evicted (LRU).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

DEFAULT_BALANCE = 1.25  # a holder may carry 25% more than the mean before a copy is made elsewhere
DEFAULT_SLACK = 2.0  # requests of headroom at low load, where the mean is near zero


@dataclass(frozen=True)
class ReplicaState:
    """What the policy knows about one replica for one request."""

    id: Hashable
    in_flight: int  # requests sent to it and not finished (queued or running there)
    holds: bool  # the adapter is resident there (or on its way), as far as the router knows


def rendezvous(adapter: str, replica_id: Hashable) -> int:
    """Highest-random-weight hash: a stable, uniformly spread preference of ``adapter`` per replica."""
    digest = hashlib.blake2b(f"{adapter}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def load_bound(total_in_flight: int, n_replicas: int, balance: float = DEFAULT_BALANCE,
               slack: float = DEFAULT_SLACK) -> float:
    """In-flight count a holder must stay under to keep receiving its adapter's requests."""
    return balance * (total_in_flight + 1) / max(1, n_replicas) + slack


def rank_replicas(adapter: str | None, replicas: Sequence[ReplicaState], *, balance: float = DEFAULT_BALANCE,
                  slack: float = DEFAULT_SLACK, total_in_flight: int | None = None,
                  n_replicas: int | None = None) -> list[list[Hashable]]:
    """Ranked replica ids for one request (rank 0 most preferred); see the module docstring.

    ``replicas`` are the candidates (all replicas, or at scale the holders plus a few sampled
    ones); ``total_in_flight`` / ``n_replicas`` describe the whole fleet when the candidates are
    only part of it. ``adapter=None`` (the base model) has no affinity: least loaded first.
    """
    if not replicas:
        return []
    total = sum(r.in_flight for r in replicas) if total_in_flight is None else total_in_flight
    n = len(replicas) if n_replicas is None else n_replicas
    if adapter is None:
        return [[r.id for r in sorted(replicas, key=lambda r: r.in_flight)]]
    bound = load_bound(total, n, balance, slack)
    hrw = {r.id: rendezvous(adapter, r.id) for r in replicas}
    ok = sorted((r for r in replicas if r.holds and r.in_flight < bound), key=lambda r: (r.in_flight, -hrw[r.id]))
    home = sorted((r for r in replicas if not r.holds and r.in_flight < bound), key=lambda r: -hrw[r.id])
    busy = sorted((r for r in replicas if r.in_flight >= bound), key=lambda r: (r.in_flight, not r.holds, -hrw[r.id]))
    ranks: list[list[Hashable]] = [[r.id for r in ok]] if ok else []
    ranks += [[r.id] for r in home + busy]  # one at a time: Ray must not pick "any" of them
    return ranks


def choose(adapter: str | None, replicas: Sequence[ReplicaState], **options) -> Hashable:
    """The single replica ``rank_replicas`` prefers (what a router does when no queue is full)."""
    ranks = rank_replicas(adapter, replicas, **options)
    if not ranks:
        raise ValueError("no replicas to choose from")
    return ranks[0][0]


class Residency:
    """The router's own view of which adapters each replica holds: an LRU of ``capacity`` per replica.

    Ray learns what a replica holds only after it has reported (about 0.1 s, through the
    controller); a burst of requests for a new adapter would scatter before that. The router
    therefore remembers where it sent each adapter, evicting in the same LRU order as the
    replica's cache, and unions that with what the replicas report.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity ({capacity}) must be >= 1 adapter per replica")
        self.capacity = capacity
        self._lru: dict[Hashable, OrderedDict[str, None]] = {}
        self._holders: dict[str, set[Hashable]] = {}

    def holders(self, adapter: str) -> set[Hashable]:
        return self._holders.get(adapter, set())

    def holds(self, replica: Hashable, adapter: str) -> bool:
        return replica in self._holders.get(adapter, ())

    def count(self, replica: Hashable) -> int:
        return len(self._lru.get(replica, ()))

    def touch(self, replica: Hashable, adapter: str) -> str | None:
        """Record that ``replica`` serves ``adapter`` now; returns the adapter it evicts, if any."""
        lru = self._lru.setdefault(replica, OrderedDict())
        if adapter in lru:
            lru.move_to_end(adapter)
            return None
        lru[adapter] = None
        self._holders.setdefault(adapter, set()).add(replica)
        if len(lru) <= self.capacity:
            return None
        victim, _ = lru.popitem(last=False)
        self._drop(victim, replica)
        return victim

    def forget_replica(self, replica: Hashable) -> None:
        for adapter in self._lru.pop(replica, ()):
            self._drop(adapter, replica)

    def retain(self, replicas: Iterable[Hashable]) -> None:
        """Forget every replica not in ``replicas`` (dead or scaled down)."""
        keep = set(replicas)
        for replica in [r for r in self._lru if r not in keep]:
            self.forget_replica(replica)

    def _drop(self, adapter: str, replica: Hashable) -> None:
        holders = self._holders.get(adapter)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[adapter]
