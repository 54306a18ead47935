"""Which adapter to load next, which to evict, which to drain: pure functions over a cache snapshot.

No threads, no model, no files: the scheduler takes a ``CacheView`` (``AdapterCache.snapshot()``),
asks these functions, and carries the answer out through the cache's mechanism (``begin_load``,
``acquire``). So every rule has table-driven tests (tests/engine/test_policy.py). The rules
themselves are documented in ``scheduler.py``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from loramux.cache import AdapterState, CacheView


class LoadStatus(str, enum.Enum):
    """What ``load_decision`` says about one wanted adapter (a str, so ``== "loading"`` reads naturally)."""

    RESIDENT = "resident"      # already servable
    LOADING = "loading"        # a load is in flight (or START: begin one now, with these victims)
    START = "start"
    BUSY = "busy"              # the loader is saturated; later names would be refused too
    FULL = "full"              # no room until pinned adapters are released (rotation may drain one)
    TOO_BIG = "too_big"        # can never fit max_bytes
    NEVER_FITS = "never_fits"  # adapters that cannot be evicted fill the limits


@dataclass(frozen=True)
class Decision:
    status: LoadStatus
    victims: tuple[str, ...] = ()
    reason: str = ""


def demand(waiting: Iterable[str | None], view: CacheView) -> tuple[list[str], set[str], set[str]]:
    """From the waiting adapters in arrival order (None = base): the non-resident ones in order of their
    first request (``wanted``; ``wanted[0]`` is the head), the resident ones some waiting request wants
    (``protected``), and those among them wanted by a request queued before the head's (``ahead``)."""
    wanted: list[str] = []
    protected: set[str] = set()
    ahead: set[str] = set()
    for name in waiting:
        if name is None:
            continue
        if view.is_resident(name):
            protected.add(name)
            if not wanted:
                ahead.add(name)
        elif name not in wanted:
            wanted.append(name)
    return wanted, protected, ahead


def victims(view: CacheView, need: int, protected: frozenset[str] | set[str] = frozenset(), force: bool = False,
            keep: frozenset[str] | set[str] = frozenset()) -> list[str] | None:
    """Unpinned resident adapters to evict, least recently used first, so that one more adapter of
    ``need`` bytes fits; None if impossible now. ``protected`` ones are taken only with ``force``, and
    ``keep`` ones never. Retired loads still pinned count as used until they leave."""
    count = len(view.records) + len(view.retired)
    used = sum(r.nbytes for r in view.records) + sum(view.retired)
    candidates = sorted((r.tick, r.name) for r in view.records
                        if r.state is AdapterState.RESIDENT and r.pins == 0 and not r.permanent)
    order = [n for _, n in candidates if n not in protected]
    if force:
        order += [n for _, n in candidates if n in protected and n not in keep]
    nbytes = {r.name: r.nbytes for r in view.records}
    chosen: list[str] = []
    for name in [None, *order]:
        if name is not None:
            chosen.append(name)
            count -= 1
            used -= nbytes[name]
        fits_count = view.max_loaded is None or count + 1 <= view.max_loaded
        fits_bytes = view.max_bytes is None or used + need <= view.max_bytes
        if fits_count and fits_bytes:
            return chosen
    return None


def load_decision(view: CacheView, name: str, need: int, protected: frozenset[str] | set[str] = frozenset(),
                  force: bool = False, keep: frozenset[str] | set[str] = frozenset()) -> Decision:
    """Whether to begin loading ``name`` (``need`` bytes) now, and in place of whom."""
    record = view.get(name)
    if record is not None:
        return Decision(LoadStatus(record.state.value))  # resident or loading
    if view.loads_in_flight >= view.max_concurrent_loads:
        return Decision(LoadStatus.BUSY)
    if view.max_bytes is not None and need > view.max_bytes:
        return Decision(LoadStatus.TOO_BIG, reason=f"adapter {name!r} needs about {need} bytes but max_adapter_bytes "
                                                   f"is {view.max_bytes}; raise max_adapter_bytes")
    chosen = victims(view, need, protected, force, keep)
    if chosen is not None:
        return Decision(LoadStatus.START, tuple(chosen))
    busy = bool(view.retired) or any(r.pins or r.state is not AdapterState.RESIDENT for r in view.records)
    if not busy and victims(view, need, frozenset(), True) is None:
        return Decision(LoadStatus.NEVER_FITS, reason=(
            f"adapter {name!r} cannot be loaded: the resident adapters that cannot be evicted (loaded outside the "
            f"registry) fill max_loaded_adapters={view.max_loaded} / max_adapter_bytes={view.max_bytes}"))
    return Decision(LoadStatus.FULL)


def drain_choice(view: CacheView, draining: set[str], ahead: set[str], protected: set[str]) -> str | None:
    """Rotation: the pinned adapter to stop admitting requests for, so that it frees its place for the
    head's adapter; None while one already draining is still pinned, or when none qualifies.

    Candidates: pinned resident adapters not already draining and not wanted by a request queued ahead
    of the head (it would wait behind the drain); nobody-waiting-wants-it first, then fewest pins,
    then least recently used."""
    if any((r := view.get(d)) is not None and r.pins > 0 for d in draining):
        return None
    candidates = sorted((r.name in protected, r.pins, r.tick, r.name) for r in view.records
                        if r.state is AdapterState.RESIDENT and r.pins > 0 and not r.permanent
                        and r.name not in draining and r.name not in ahead)
    return candidates[0][3] if candidates else None
