"""Pieces of the Ray app that need no cluster: the replica's health check, the versioned adapter keys."""
from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.ray


class _Engine:
    def __init__(self, thread):
        self._thread = thread


def _replica(thread):
    pytest.importorskip("ray.serve")
    from loramux.ray.replica import EngineReplica

    replica = EngineReplica.__new__(EngineReplica)  # no Serve context needed for check_health
    replica.engine, replica.name = _Engine(thread), "r0"
    return replica


def test_a_replica_whose_engine_thread_died_reports_unhealthy():
    done = threading.Event()
    alive = threading.Thread(target=done.wait, daemon=True)
    alive.start()
    try:
        _replica(alive).check_health()  # running: healthy
    finally:
        done.set()
        alive.join()
    with pytest.raises(RuntimeError, match="step-loop thread is not running"):
        _replica(alive).check_health()  # the same thread, now dead: Ray replaces the replica
    with pytest.raises(RuntimeError):
        _replica(None).check_health()


def test_a_reloaded_or_unloaded_name_gets_a_new_key(tmp_path):
    from loramux.cache import AdapterRegistry
    from loramux.ray.ingress import VersionedNames

    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    registry = AdapterRegistry()
    names = VersionedNames(registry)
    registry.register("x", tmp_path / "x")
    assert names.key("x") == "x"
    registry.unregister("x")
    registry.register("x", tmp_path / "x")
    assert names.key("x") == "x#v1"  # a replica still holding the old weights under "x" never serves them
    registry.register("x", tmp_path / "y")  # re-pointed
    assert names.key("x") == "x#v2"


def test_the_fleet_view_leaves_out_replicas_ray_no_longer_routes_to():
    pytest.importorskip("prometheus_client")
    from loramux.ray.fleet import Fleet
    from loramux.ray.messages import ReplicaStats

    live = {"r0", "r1"}
    fleet = Fleet(lambda: live)
    for name, loads in (("r0", 3), ("r1", 5)):
        fleet.update(ReplicaStats(name, 1, "node", ("a0",), {"loads": loads, "evictions": 1}), accepted=True)
    assert [row["replica"] for row in fleet.snapshot()] == ["r0", "r1"]
    assert fleet.totals()["loads"] == 8
    live.discard("r1")  # replaced by Ray while idle: no stream broke, the router's replica set changed
    assert [row["replica"] for row in fleet.snapshot()] == ["r0"] and fleet.totals()["loads"] == 3
    fleet.lost("r0")  # a stream from it broke: gone at once, and late reports from it are ignored
    fleet.update(ReplicaStats("r0", 1, "node", (), {"loads": 9}))
    assert fleet.snapshot() == [] and fleet.totals() == {"replicas": 0}
