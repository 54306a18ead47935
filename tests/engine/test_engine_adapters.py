"""The engine with the adapter cache: loads do not stall others, rotation does not starve, pins hold."""
from __future__ import annotations

import threading
import time

from engine_helpers import run_all
from loramux.engine import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def test_a_slow_load_does_not_block_resident_requests(llama_model, registry):
    gate = threading.Event()
    real_load = llama_model.load_adapter

    def slow_load(path, adapter_name=None, **kw):
        if adapter_name == "b":
            gate.wait(30)
        return real_load(path, adapter_name=adapter_name, **kw)

    llama_model.load_adapter = slow_load
    llama_model.load_adapter(registry.path_of("a"), adapter_name="a")
    engine = Engine(llama_model, registry=registry)
    slow = engine.submit([3, 4, 5], "b", GREEDY)  # first in line, but its adapter is not resident
    fast = [engine.submit([6, 7], name, GREEDY) for name in ("a", None, "a")]
    run_all(engine, fast)  # served while "b" is still loading
    assert not slow.finished and engine.cache.is_loading("b")
    gate.set()
    assert run_all(engine, [slow])[0].finish_reason == "length"
    stats = engine.stats()
    assert stats["hits"] == 3 and stats["misses"] == 1 and stats["loads"] == 1


def test_rotation_serves_a_rare_adapter_amid_a_stream_of_popular_ones(llama_model, registry):
    """One resident slot, a never-ending stream for "a": the request for "b" must still be served."""
    engine = Engine(llama_model, registry=registry, max_running=2, max_loaded_adapters=1)
    first = engine.submit([3, 4], "a", GREEDY)
    run_all(engine, [first])  # "a" resident
    stream = [engine.submit([5, 6], "a", GREEDY) for _ in range(2)]
    rare = engine.submit([7, 8], "b", GREEDY)
    served_before = None
    for step in range(2000):
        if rare.finished:
            served_before = sum(h.finished for h in stream)
            break
        if step % 2 == 0:  # "a" requests keep arriving faster than they finish
            stream.append(engine.submit([5, 6], "a", GREEDY))
        if not engine.step():
            time.sleep(0.002)  # only waiting on the load of "b"
    assert rare.finished and rare.result().finish_reason == "length", "the rare adapter starved"
    # "a" requests that arrived after "b" did not overtake it beyond the ones admitted in b's first step
    assert served_before <= 4, served_before
    run_all(engine, stream)  # and the popular ones all drain afterwards
    assert all(h.result().finish_reason == "length" for h in stream)
    stats = engine.stats()
    assert stats["evictions"] >= 1 and stats["resident_adapters"] == 1


def test_eviction_never_touches_an_adapter_in_use(llama_model, registry):
    """Tiny budget (one resident adapter), four adapters wanted: at every step, every running
    request's adapter is loaded in the model."""
    engine = Engine(llama_model, registry=registry, max_running=3, max_loaded_adapters=1, prefill_chunk=4)
    handles = [engine.submit([3 + i] * (2 + i % 5), "abcd"[i % 4], SamplingParams(max_tokens=3 + i % 4, temperature=0))
               for i in range(16)]
    deadline = time.monotonic() + 300  # bounded in time, not steps: background loads may lag on a busy machine
    while time.monotonic() < deadline:
        if all(h.finished for h in handles):
            break
        if not engine.step():
            time.sleep(0.002)
        for req in engine.scheduler.running:
            assert req.adapter in llama_model.adapters
            assert engine.cache.pins(req.adapter) > 0
        adapters = [r.adapter for r in engine.batch.rows]  # decode rows stay grouped by adapter
        assert len([a for i, a in enumerate(adapters) if i == 0 or a != adapters[i - 1]]) == len(set(adapters))
        assert len(llama_model.adapters) <= 1
    assert all(h.finished for h in handles), "requests did not finish within 300 s"
    assert all(h.result().finish_reason in ("stop", "length") for h in handles)
    assert engine.stats()["evictions"] >= 3
