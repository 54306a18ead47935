"""``loramux serve --replicas N`` as a user runs it: a subprocess that starts (and on SIGTERM shuts down)
its own local Ray instance; ``--replicas 1`` stays the plain single process without Ray."""
from __future__ import annotations

import signal

import httpx
import psutil
import pytest

from conftest import wait_for
from srv_process import ServerProcess

pytestmark = pytest.mark.ray


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _is_ray(p: psutil.Process) -> bool:
    try:
        text = " ".join([p.name(), *p.cmdline()])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(word in text for word in ("raylet", "gcs_server", "ray::", "ray/_private", "default_worker"))


def test_replicas_2_serves_through_ray_and_sigterm_leaves_no_ray_process(ray_world, tmp_path):
    pytest.importorskip("ray")
    args = ["--replicas", "2", "--threads", "1", "--base", str(ray_world["base"]), "--adapter-root", str(ray_world["root"]),
            "--adapter-root", str(ray_world["runtime"]), "--allow-runtime-loading", "--max-loaded-adapters", "4",
            "--log-level", "warning"]
    server = ServerProcess(args, tmp_path / "serve.log", startup_timeout=600)

    def served_by(model: str) -> str:
        r = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4,
                                                             "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-loramux-replica"]

    try:
        seen = {served_by(model) for model in ("a0", "a1", "a2", "a3")}
        # Both replicas serve: an adapter's home is a rendezvous hash of Ray's random replica ids, so the four
        # land on one replica in 1 run of 8 (it failed a fresh-clone run so); more names until the other one
        # serves too (each a fair coin: 40 names leave a 2**-40 chance).
        for i in range(40):
            if len(seen) == 2:
                break
            r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": f"spread{i}",
                                                                      "lora_path": str(ray_world["good"])}, timeout=120)
            assert r.status_code == 200, r.text
            seen.add(served_by(f"spread{i}"))
        assert len(seen) == 2, seen
        started = [p for p in _tree(server.proc.pid) if _is_ray(p)]
        assert started, "no Ray process under loramux serve --replicas 2"
    finally:
        code = server.stop(signal.SIGTERM, timeout=240)
    assert code == 0, server.log()

    def all_gone() -> bool:
        return not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(all_gone, 120, "every Ray process started by loramux serve to exit")


def test_replicas_1_is_the_plain_process_without_ray(ray_world, tmp_path):
    args = ["--replicas", "1", "--threads", "1", "--base", str(ray_world["base"]), "--adapter-root",
            str(ray_world["root"]), "--log-level", "warning"]
    server = ServerProcess(args, tmp_path / "serve1.log", startup_timeout=600)
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": "a0", "prompt": "hello", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert "x-loramux-replica" not in r.headers  # the plain server: no Ray, no replicas
        assert not [p for p in _tree(server.proc.pid) if _is_ray(p)]
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.log()
