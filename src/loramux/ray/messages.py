"""What an engine replica streams back to the ingress besides the engine's own ``RequestOutput`` deltas.

Plain frozen dataclasses (Ray pickles them). A generation stream is: ``Accepted`` or ``Refused``
first, then the engine's deltas, with a ``ReplicaStats`` just before the final delta so that the
ingress's per-replica view of resident adapters, loads and evictions is fresh after every request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReplicaStats:
    replica: str  # Ray's replica id (unique within the deployment)
    pid: int
    node: str
    resident: tuple[str, ...]  # adapters in this replica's engine cache
    engine: dict[str, Any] = field(default_factory=dict)  # engine.stats()


@dataclass(frozen=True)
class Accepted:
    """The replica's engine took the request."""

    stats: ReplicaStats


@dataclass(frozen=True)
class Refused:
    """``engine.submit`` refused the request; ``kind`` names the exception the ingress re-raises."""

    kind: str  # "unknown_adapter" | "overloaded" | "rejected"
    message: str
    replica: str
