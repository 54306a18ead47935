"""Releasing the caller's OpenMP pool when the engine starts: harmless to the caller, done once per start."""
from __future__ import annotations

import threading

import torch

import loramux.engine.engine as engine_module
from loramux.engine import Engine, SamplingParams
from loramux.openmp import release_thread_pool


def test_release_leaves_torch_working_and_exact_in_every_thread():
    torch.manual_seed(0)
    a, b = torch.randn(257, 300), torch.randn(300, 129)
    before = a @ b
    released = release_thread_pool()
    assert isinstance(released, bool)
    assert torch.equal(a @ b, before)  # the caller's next parallel region makes a pool again
    results = []
    worker = threading.Thread(target=lambda: results.append(a @ b))
    worker.start()
    worker.join()
    assert torch.equal(results[0], before)
    assert release_thread_pool() == released  # idempotent: nothing to free the second time is fine


def test_engine_start_releases_the_callers_pool_once_and_still_answers(llama_model, monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module, "release_thread_pool", lambda: calls.append(threading.get_ident()) or True)
    engine = Engine(llama_model, None, max_running=2)
    with engine:
        engine.start()  # idempotent: no second release
        out = engine.submit([5, 6, 7], None, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)).result()
    assert calls == [threading.get_ident()]  # in the caller's thread, not the engine's
    assert len(out.token_ids) == 3


def test_engine_start_loads_the_cpu_kernel_before_serving(llama_model, monkeypatch):
    """A machine that never built the kernel pays the build in start(), not in a request's decode step."""
    loads = []
    real = engine_module.cpu_kernel.load
    monkeypatch.setattr(engine_module.cpu_kernel, "load", lambda: loads.append(threading.get_ident()) or real())
    engine = Engine(llama_model, None, max_running=2)
    with engine:
        assert loads == [threading.get_ident()]
        out = engine.submit([5, 6, 7], None, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)).result()
    assert len(out.token_ids) == 2
