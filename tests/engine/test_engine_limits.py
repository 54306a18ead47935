"""Bounded memory, refusals, cancellation, failing loads: the engine keeps serving and loses nothing."""
from __future__ import annotations

import json
import threading

import pytest

from engine_helpers import GUARD_S, run_all, step_until
from loramux.engine import Engine, EngineOverloaded, RequestRejected, SamplingParams
from loramux.errors import UnknownAdapterError

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_prompt_that_cannot_fit_is_refused(llama_model, registry):
    engine = Engine(llama_model, registry=registry, max_kv_tokens=64)
    with pytest.raises(RequestRejected, match="the prompt has 64 tokens"):
        engine.submit([5] * 64, "a", GREEDY)
    with pytest.raises(RequestRejected, match="context holds 128"):
        Engine(llama_model, registry=registry).submit([5] * 200, None, GREEDY)
    with pytest.raises(RequestRejected, match="empty"):
        engine.submit([], None, GREEDY)
    with pytest.raises(RequestRejected, match="token ids"):
        engine.submit([5, 9999], None, GREEDY)
    with pytest.raises(RequestRejected, match="tokenizer"):
        engine.submit("text without a tokenizer", None, GREEDY)
    # a prompt that fits is still served
    assert engine.generate([[5] * 63], ["a"], GREEDY)[0].finish_reason == "length"


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                                 dict(seed=-1), dict(stop=[""])])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(RequestRejected):
        SamplingParams(**bad)


def test_unknown_adapter_is_refused_at_submit(llama_model, registry):
    engine = Engine(llama_model, registry=registry)
    with pytest.raises(UnknownAdapterError, match="nope"):
        engine.submit([3, 4], "nope", GREEDY)
    with pytest.raises(UnknownAdapterError):
        engine.submit([3, 4], "../a", GREEDY)


def test_queue_longer_than_the_batch_limit_drains_within_limits(llama_model, registry):
    engine = Engine(llama_model, registry=registry, max_running=2, max_kv_tokens=40, max_loaded_adapters=1)
    handles = [engine.submit([3 + i] * (3 + i % 7), [None, "a", "b", "c"][i % 4], GREEDY) for i in range(20)]
    peak_running = peak_kv = 0

    def check() -> bool:
        nonlocal peak_running, peak_kv
        peak_running = max(peak_running, len(engine.running_requests()))
        peak_kv = max(peak_kv, engine.scheduler.kv_reserved)
        assert engine.stats()["resident_adapters"] <= 1
        return all(h.finished for h in handles)

    step_until(engine, check, "every request finishing")
    assert [h.result().finish_reason for h in handles] == ["length"] * 20
    assert peak_running == 2 and peak_kv <= 40
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == stats["kv_tokens_reserved"] == stats["kv_bytes"] == 0


def test_full_queue_raises_overloaded(llama_model, registry):
    engine = Engine(llama_model, registry=registry, max_waiting=2)
    engine.submit([3], None, GREEDY)
    engine.submit([3], None, GREEDY)
    with pytest.raises(EngineOverloaded):
        engine.submit([3], None, GREEDY)


def test_cancellation_frees_the_slot(llama_model, registry):
    engine = Engine(llama_model, registry=registry, max_running=1)
    long = engine.submit([5, 6], "a", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    step_until(engine, lambda: engine.cache.pins("a") > 0, "'a' loading and running")
    queued = engine.submit([7, 8], "b", GREEDY)
    waiting = engine.submit([9], None, GREEDY)
    for _ in range(3):
        engine.step()
    assert not long.finished and engine.cache.pins("a") == 1
    waiting.cancel()  # cancelled while still queued
    long.cancel()  # cancelled while decoding
    engine.step()
    assert long.result().finish_reason == "abort" and 0 < long.result().completion_tokens < 100
    assert waiting.result().finish_reason == "abort" and waiting.result().completion_tokens == 0
    assert engine.cache.pins("a") == 0
    assert run_all(engine, [queued])[0].finish_reason == "length"
    assert engine.stats()["running"] == 0


def test_failing_adapter_load_fails_only_its_requests(llama_model, registry, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    registry.register("broken", broken)
    engine = Engine(llama_model, registry=registry, max_running=4)
    handles = [engine.submit([3, 4, 5], name, GREEDY) for name in ["a", "broken", None, "broken", "b"]]
    results = run_all(engine, handles)
    assert [r.finish_reason for r in results] == ["length", "error", "length", "error", "length"]
    assert "cannot be read" in results[1].error and results[1].completion_tokens == 0
    assert engine.stats()["load_errors"] == 1
    # the engine keeps serving, and a later request for it retries the load (and fails again)
    assert engine.generate([[3]], ["broken"], GREEDY)[0].finish_reason == "error"
    assert engine.generate([[3]], ["a"], GREEDY)[0].finish_reason == "length"


def test_adapter_too_big_for_the_byte_budget_fails_its_requests(llama_model, registry):
    engine = Engine(llama_model, registry=registry, max_adapter_bytes=100)
    res = engine.generate([[3, 4]], ["a"], GREEDY)[0]
    assert res.finish_reason == "error" and "max_adapter_bytes" in res.error


def test_shutdown_finishes_running_requests(llama_model, registry):
    engine = Engine(llama_model, registry=registry).start()
    handles = [engine.submit([3, 4, 5], a, GREEDY) for a in (None, "a", "b")]
    engine.shutdown()
    assert [h.result(timeout=1).finish_reason for h in handles] == ["length"] * 3
    with pytest.raises(EngineOverloaded, match="shutting down"):
        engine.submit([3], None, GREEDY)


def test_shutdown_with_abort(llama_model, registry, monkeypatch):
    """The engine thread is held inside a decode forward until shutdown(abort=True) has registered
    its cancellations, so the request cannot finish first (no race against a number of tokens)."""
    real, inside, release = llama_model.forward, threading.Event(), threading.Event()

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # a decode step
            inside.set()
            release.wait(GUARD_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(llama_model, "forward", forward)
    engine = Engine(llama_model, registry=registry).start()
    handle = engine.submit([3, 4, 5], "a", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert inside.wait(GUARD_S)
    stopper = threading.Thread(target=engine.shutdown, kwargs={"abort": True})
    stopper.start()
    with engine._wake:  # shutdown() registers the cancel under the engine's lock and notifies
        assert engine._wake.wait_for(lambda: handle.request_id in engine._cancels, GUARD_S)
    release.set()
    stopper.join(GUARD_S)
    result = handle.result(timeout=GUARD_S)
    assert result.finish_reason == "abort" and result.completion_tokens < 100


def test_unregistered_adapter_is_no_longer_served(llama_model, registry):
    engine = Engine(llama_model, registry=registry)
    assert engine.generate([[3, 4]], ["a"], GREEDY)[0].finish_reason == "length"
    registry.unregister("a")
    with pytest.raises(UnknownAdapterError):
        engine.submit([3, 4], "a", GREEDY)
    assert "a" not in llama_model.adapters  # unused: evicted at once


def test_shutdown_of_a_never_started_engine_finishes_or_aborts_its_requests(llama_model, registry):
    engine = Engine(llama_model, registry=registry)
    done = engine.submit([3, 4], "a", GREEDY)
    engine.shutdown()
    assert done.result(timeout=0).finish_reason == "length"
    engine = Engine(llama_model, registry=registry)
    aborted = engine.submit([3, 4], "b", GREEDY)
    engine.shutdown(abort=True)
    assert aborted.result(timeout=0).finish_reason == "abort"
