"""The engine with the adapter cache: loads do not stall others, rotation does not starve, pins hold."""
from __future__ import annotations

import threading
import time

from engine_helpers import run_all, step_until, wait_for_progress
from loramux.engine import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def test_a_slow_load_does_not_block_resident_requests(llama_model, registry):
    gate = threading.Event()
    real_load = llama_model.load_adapter

    def slow_load(path, adapter_name=None, **kw):
        if adapter_name == "b":
            gate.wait()  # held until the test has seen the others served: no timeout to race
        return real_load(path, adapter_name=adapter_name, **kw)

    llama_model.load_adapter = slow_load
    llama_model.load_adapter(registry.path_of("a"), adapter_name="a")
    engine = Engine(llama_model, registry=registry)
    estimated, real_estimate = [], engine.cache.estimate
    engine.cache.estimate = lambda name: estimated.append(name) or real_estimate(name)
    try:
        slow = engine.submit([3, 4, 5], "b", GREEDY)  # first in line, but its adapter is not resident
        fast = [engine.submit([6, 7], name, GREEDY) for name in ("a", None, "a")]
        run_all(engine, fast)  # served while "b" is still loading
        assert not slow.finished and engine.cache.is_loading("b")
        assert estimated == ["b"]  # its header was parsed once, to start the load: not again each step
    finally:
        gate.set()  # whatever happened above, the loader thread is released
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
    productive, submitted_at = 0, -1

    def served_or_step() -> bool:
        nonlocal productive, submitted_at
        if rare.finished:
            return True
        if productive % 2 == 0 and submitted_at != productive:  # "a" keeps arriving faster than it finishes
            stream.append(engine.submit([5, 6], "a", GREEDY))
            submitted_at = productive
        if engine.step():
            productive += 1  # only steps that ran count: a slow load of "b" adds no "a" requests
        else:
            wait_for_progress(engine)
        return False

    # bounded by steps that ran, not by time: if "b" starved, this ends with the assertion below
    step_until(engine, lambda: served_or_step() or productive > 2000, "serving the rare adapter")
    assert rare.finished and rare.result().finish_reason == "length", "the rare adapter starved"
    served_before = sum(h.finished for h in stream)
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

    def check() -> bool:
        for req in engine.running_requests():
            assert req.adapter in llama_model.adapters
            assert engine.cache.pins(req.adapter) > 0
        adapters = [r.adapter for r in engine.batch.rows]  # decode rows stay grouped by adapter
        assert len([a for i, a in enumerate(adapters) if i == 0 or a != adapters[i - 1]]) == len(set(adapters))
        assert len(llama_model.adapters) <= 1
        return all(h.finished for h in handles)

    step_until(engine, check, "every request finishing")
    assert all(h.result().finish_reason in ("stop", "length") for h in handles)
    assert engine.stats()["evictions"] >= 3


def test_a_reload_serves_new_requests_at_once_while_running_ones_finish_on_the_old_weights(
        llama_model, registry, llama_adapters):
    """Re-pointing a name (the server's ``load_inplace``) retires its load: the request running on it
    keeps the old weights to its last token, a new request for the name gets the new weights without
    waiting for it, and both decode in one batch (one name, two loads, two slots)."""
    from engine_helpers import GUARD_S, solo_greedy, tiny_llama
    from loramux import MultiLoraModel

    prompt = [3, 4, 5]
    oracle = MultiLoraModel(tiny_llama())
    oracle.load_adapter(llama_adapters["a"], adapter_name="old")
    oracle.load_adapter(llama_adapters["b"], adapter_name="new")
    expected_old, expected_new = solo_greedy(oracle, prompt, "old", 12), solo_greedy(oracle, prompt, "new", 4)
    assert expected_old[:4] != expected_new

    engine = Engine(llama_model, registry=registry)
    running = engine.submit(prompt, "a", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    step_until(engine, lambda: engine.batch and len(engine.batch.rows[0].output_ids) >= 2, "two tokens")
    old_load = llama_model.adapters["a"]
    registry.register("a", llama_adapters["b"])  # new files under the same name
    assert "a" not in llama_model.adapters and llama_model.retired_loads() == [old_load]
    fresh = engine.submit(prompt, "a", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()  # starts the load of the new files (and decodes one more token of the running request)
    deadline = time.monotonic() + GUARD_S
    while not engine.cache.is_resident("a"):  # no stepping while it loads: the running request cannot get ahead
        assert time.monotonic() < deadline, "the new files never loaded"
        wait_for_progress(engine)  # woken when the load ends
    assert not running.finished
    step_until(engine, lambda: any(r.req.handle is fresh for r in engine.batch.rows), "the new request decoding")
    loads = {id(r.load): r.adapter for r in engine.batch.rows}
    assert len(loads) == 2 and set(loads.values()) == {"a"}  # old and new weights side by side
    assert [r.token_ids for r in run_all(engine, [running, fresh])] == [expected_old, expected_new]
    assert llama_model.retired_loads() == [] and llama_model.pins(llama_model.adapters["a"]) == 0
