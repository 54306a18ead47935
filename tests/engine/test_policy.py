"""The adapter policy as tables: a cache snapshot in, a decision out (no threads, no model)."""
from __future__ import annotations

import pytest

from loramux.cache import AdapterState, CacheView, RecordView
from loramux.engine.policy import LoadStatus, demand, drain_choice, load_decision, victims

R, L = AdapterState.RESIDENT, AdapterState.LOADING


def view(*records, max_loaded=3, max_bytes=None, loads=1, retired=()):
    """records: (name, state, pins, tick[, nbytes[, permanent]]); retired: bytes of loads no longer
    served but still pinned."""
    out = []
    for rec in records:
        name, state, pins, tick, *rest = rec
        nbytes = rest[0] if rest else 10
        permanent = rest[1] if len(rest) > 1 else False
        out.append(RecordView(name, state, nbytes, pins, tick, permanent))
    return CacheView(tuple(out), max_loaded, max_bytes, loads, tuple(retired))


VICTIMS = [
    # (records, need, protected, force, keep, expected)
    ([], 10, set(), False, set(), []),                                              # empty: fits
    ([("a", R, 0, 1), ("b", R, 0, 2)], 10, set(), False, set(), []),                # room for a third
    ([("a", R, 0, 2), ("b", R, 0, 1), ("c", R, 0, 3)], 10, set(), False, set(), ["b"]),  # LRU first
    ([("a", R, 1, 1), ("b", R, 0, 2), ("c", R, 0, 3)], 10, set(), False, set(), ["b"]),  # pinned never
    ([("a", R, 1, 1), ("b", R, 1, 2), ("c", L, 0, 3)], 10, set(), False, set(), None),   # all pinned/loading
    ([("a", R, 0, 1), ("b", R, 0, 2), ("c", R, 0, 3)], 10, {"a"}, False, set(), ["b"]),  # protected skipped
    ([("a", R, 0, 1), ("b", R, 1, 2), ("c", R, 1, 3)], 10, {"a"}, False, set(), None),   # ... unless forced
    ([("a", R, 0, 1), ("b", R, 1, 2), ("c", R, 1, 3)], 10, {"a"}, True, set(), ["a"]),
    ([("a", R, 0, 1), ("b", R, 1, 2), ("c", R, 1, 3)], 10, {"a"}, True, {"a"}, None),    # kept: never
    ([("a", R, 0, 1, 10, True), ("b", R, 0, 2), ("c", R, 0, 3)], 10, set(), False, set(), ["b"]),  # permanent
]


@pytest.mark.parametrize("records, need, protected, force, keep, expected", VICTIMS)
def test_victims(records, need, protected, force, keep, expected):
    assert victims(view(*records), need, protected, force, keep) == expected


def test_victims_by_bytes():
    v = view(("a", R, 0, 1, 40), ("b", R, 0, 2, 40), max_loaded=None, max_bytes=100)
    assert victims(v, 20, set()) == [] and victims(v, 30, set()) == ["a"] and victims(v, 70, set()) == ["a", "b"]


def test_retired_loads_still_pinned_count_against_both_limits():
    """A reloaded or unregistered adapter's old weights stay until their requests finish: they take
    room (a count and bytes) that no eviction can give back."""
    assert victims(view(("a", R, 0, 1), ("b", R, 0, 2), retired=(10,)), 10) == ["a"]
    assert victims(view(("a", R, 1, 1), ("b", R, 1, 2), retired=(10,)), 10) is None
    v = view(("a", R, 0, 1, 40), max_loaded=None, max_bytes=100, retired=(50,))
    assert victims(v, 10, set()) == [] and victims(v, 20, set()) == ["a"] and victims(v, 60, set()) is None
    # not NEVER_FITS: the retired load leaves when its requests end
    assert load_decision(view(max_loaded=1, retired=(10,)), "a", 10).status is LoadStatus.FULL


DECISIONS = [
    # (records, name, need, force, kwargs, expected status, expected victims)
    ([("a", R, 0, 1)], "a", 10, False, {}, LoadStatus.RESIDENT, ()),
    ([("a", L, 0, 1)], "a", 10, False, {}, LoadStatus.LOADING, ()),
    ([("z", L, 0, 1)], "a", 10, False, {}, LoadStatus.BUSY, ()),                # one load at a time
    ([("z", L, 0, 1)], "a", 10, False, {"loads": 2}, LoadStatus.START, ()),
    ([("a", R, 0, 1), ("b", R, 0, 2), ("c", R, 0, 3)], "d", 10, False, {}, LoadStatus.START, ("a",)),
    ([("a", R, 1, 1), ("b", R, 1, 2), ("c", R, 1, 3)], "d", 10, False, {}, LoadStatus.FULL, ()),
    ([], "d", 200, False, {"max_bytes": 100}, LoadStatus.TOO_BIG, ()),
    ([("p", R, 0, 1, 10, True)], "d", 10, False, {"max_loaded": 1}, LoadStatus.NEVER_FITS, ()),
]


@pytest.mark.parametrize("records, name, need, force, kwargs, status, chosen", DECISIONS)
def test_load_decision(records, name, need, force, kwargs, status, chosen):
    decision = load_decision(view(*records, **kwargs), name, need, force=force)
    assert decision.status is status and decision.victims == chosen
    if status in (LoadStatus.TOO_BIG, LoadStatus.NEVER_FITS):
        assert name in decision.reason and "max_" in decision.reason


DRAINS = [
    # (records, draining, ahead, protected, expected)
    ([("a", R, 2, 1), ("b", R, 1, 2)], set(), set(), set(), "b"),          # fewest pins
    ([("a", R, 1, 1), ("b", R, 1, 2)], set(), set(), set(), "a"),          # then least recently used
    ([("a", R, 1, 1), ("b", R, 3, 2)], set(), set(), {"a"}, "b"),          # nobody-waiting-wants-it first
    ([("a", R, 1, 1), ("b", R, 3, 2)], set(), {"b"}, {"a"}, "a"),          # never one wanted ahead of the head
    ([("a", R, 1, 1), ("b", R, 1, 2)], {"a"}, set(), set(), None),         # one drain at a time
    ([("a", R, 0, 1), ("b", R, 1, 2)], {"a"}, set(), set(), "b"),          # ... the last one is done
    ([("a", R, 0, 1), ("p", R, 1, 2, 10, True)], set(), set(), set(), None),  # unpinned / permanent: none
]


@pytest.mark.parametrize("records, draining, ahead, protected, expected", DRAINS)
def test_drain_choice(records, draining, ahead, protected, expected):
    assert drain_choice(view(*records), draining, ahead, protected) == expected


def test_demand_orders_the_wanted_and_marks_who_is_ahead():
    v = view(("a", R, 0, 1), ("b", R, 0, 2))
    wanted, protected, ahead = demand(["a", None, "x", "b", "y", "x", "a"], v)
    assert wanted == ["x", "y"] and protected == {"a", "b"} and ahead == {"a"}
