"""One local Ray instance and one loramux Serve application per test module (Ray starts in ~10 s here;
the replicas load the tiny seeded model from tests/server/srv_tiny.py in well under a second)."""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))  # srv_tiny

N_ADAPTERS = 4
KEY = "sk-ray-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, guard_s: float, what: str, step_s: float = 0.2):
    """Poll ``condition`` until truthy; fail after a generous guard (never a bare sleep in the test)."""
    deadline = time.monotonic() + guard_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {guard_s:.0f} s waiting for {what}")
        time.sleep(step_s)


@pytest.fixture(scope="session")
def ray_world(tmp_path_factory):
    """A tiny base model, ``root/a0..a3`` adapters and ``runtime/good`` (a second root for runtime loading)."""
    import torch

    import srv_tiny

    torch.set_num_threads(1)
    top = tmp_path_factory.mktemp("ray_world")
    model, tokenizer = srv_tiny.build_base(top / "base")
    adapters = srv_tiny.make_adapters(model, top / "root", N_ADAPTERS)
    good = srv_tiny.make_adapter(model, top / "runtime" / "good", seed=8, r=4, target_modules=["q_proj", "v_proj"])
    return {"base": top / "base", "root": top / "root", "runtime": top / "runtime", "adapters": adapters,
            "good": good, "tokenizer": tokenizer}


def options_for(world) -> dict:
    return {"base": str(world["base"]), "adapter_root": [str(world["root"]), str(world["runtime"])],
            "served_model_name": "tiny-base", "threads": 1, "max_loaded_adapters": N_ADAPTERS, "max_running": 8,
            "api_key": KEY, "allow_runtime_loading": True}


@pytest.fixture(scope="module")
def ray_serve(ray_world):
    """Ray (2 logical CPUs, no dashboard) + the app with 2 engine replicas of 1 thread each; base URL."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from loramux.ray import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the runtime root holds only `good`, which the tests load at runtime: the registry must not find it first
    world = dict(ray_world)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(options_for(world), replicas=2, replica_cpus=1, health_check_period_s=1.0,
                        graceful_shutdown_timeout_s=2.0)
        serve.run(app, name="loramux", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        import httpx

        def ready():
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 180, "the ingress to answer /health")
        yield {"url": url, "world": world}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
