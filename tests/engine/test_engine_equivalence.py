"""Continuous batching must not change what a request gets: greedy = solo, seeded sampling = seeded sampling."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from engine_helpers import CharTokenizer, VOCAB, run_all, solo_greedy, tiny_gpt2
from loramux import MultiLoraModel
from loramux.engine import AdapterRegistry, Engine, SamplingParams


def _random_requests(seed: int, adapters: list[str | None], n: int = 14):
    rng = random.Random(seed)
    return [([rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 40))], rng.choice(adapters), rng.randrange(1, 14))
            for _ in range(n)]


def _run_with_random_arrivals(engine, reqs, seed: int):
    """Submit each request after a random number of engine steps (0-3): they join mid-flight."""
    rng = random.Random(seed)
    handles = []
    for prompt, adapter, n in reqs:
        handles.append(engine.submit(prompt, adapter, SamplingParams(max_tokens=n, temperature=0.0)))
        for _ in range(rng.randrange(0, 4)):
            engine.step()
            adapters = [r.adapter for r in engine.batch.rows]  # rows stay grouped by adapter
            assert sum(i == 0 or a != adapters[i - 1] for i, a in enumerate(adapters)) == len(set(adapters))
    return run_all(engine, handles)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_solo_under_random_arrivals_llama(llama_model, registry, seed):
    reqs = _random_requests(seed, [None, "a", "b", "c", "d"])
    # 2 resident adapters out of 4 wanted: loads, evictions and rotation happen mid-run;
    # a prefill chunk of 8 tokens splits most prompts over several steps
    engine = Engine(llama_model, registry=registry, max_running=4, max_loaded_adapters=2, prefill_chunk=8)
    results = _run_with_random_arrivals(engine, reqs, seed)
    assert engine.stats()["evictions"] > 0
    for name in "abcd":
        if name not in llama_model.adapters:
            llama_model.load_adapter(registry.path_of(name), adapter_name=name)
    for (prompt, adapter, n), res in zip(reqs, results):
        assert res.token_ids == solo_greedy(llama_model, prompt, adapter, n), (adapter, len(prompt), n)
        assert res.finish_reason in ("stop", "length")
        assert res.completion_tokens == len(res.token_ids)
    engine.shutdown()


def test_adapters_change_the_output(llama_model, registry):
    """Guard for the test above: with B != 0 every adapter answers differently from the base."""
    engine = Engine(llama_model, registry=registry)
    prompt = [5, 17, 33, 40, 61, 7]
    outs = engine.generate([prompt] * 5, [None, "a", "b", "c", "d"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in outs}) == 5
    engine.shutdown()


def test_greedy_matches_solo_gpt2(gpt2_adapters):
    model = MultiLoraModel(tiny_gpt2())
    registry = AdapterRegistry()
    for name, path in gpt2_adapters.items():
        registry.register(name, path)
    reqs = _random_requests(3, [None, "a", "b"], n=8)
    engine = Engine(model, registry=registry, max_running=3, prefill_chunk=16)
    results = _run_with_random_arrivals(engine, reqs, 3)
    for (prompt, adapter, n), res in zip(reqs, results):
        assert res.token_ids == solo_greedy(model, prompt, adapter, n)
    engine.shutdown()


def test_seeded_sampling_is_reproducible_whatever_the_batch(llama_model, registry):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    prompt = [4, 9, 22, 31, 8]
    alone = Engine(llama_model, registry=registry).generate([prompt], ["a"], params)[0]
    engine = Engine(llama_model, registry=registry, max_running=8)
    others = [SamplingParams(max_tokens=9, temperature=1.0), SamplingParams(max_tokens=3, temperature=0)]
    handles = [engine.submit([7] * (i + 3), adapter, others[i % 2]) for i, adapter in enumerate([None, "b", "a", "c"])]
    engine.step()
    engine.step()  # the seeded request joins a batch already decoding
    mine = engine.submit(prompt, "a", params)
    handles.append(engine.submit([3, 4], "d", SamplingParams(max_tokens=5, temperature=1.2)))
    run_all(engine, handles + [mine])
    assert mine.result().token_ids == alone.token_ids
    other_seed = Engine(llama_model, registry=registry).generate(
        [prompt], ["a"], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=40, seed=99, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_threaded_streaming_sync_and_async(llama_model, registry):
    tok = CharTokenizer()
    with Engine(llama_model, tok, registry=registry) as engine:
        handle = engine.submit("hello", "a", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        deltas = list(handle)
        final = handle.result(timeout=30)
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
        assert sum((d.token_ids for d in deltas), []) == final.token_ids
        assert "".join(d.text for d in deltas) == final.text == tok.decode(final.token_ids)
        assert final.finish_reason == "length" and final.completion_tokens == 8 and final.prompt_tokens == 6

        async def consume():
            h = engine.submit("abc", "b", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
            return [d async for d in h.stream()], h

        deltas, h2 = asyncio.run(consume())
        assert sum((d.token_ids for d in deltas), []) == h2.result().token_ids
        assert len(h2.result().token_ids) == 5


def test_stop_strings_and_stop_tokens(llama_model, registry):
    tok = CharTokenizer()
    engine = Engine(llama_model, tok, registry=registry)
    free = engine.generate(["hello"], ["a"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(free.text) >= 4
    stop = free.text[2:4]
    cut = engine.generate(["hello"], ["a"], SamplingParams(max_tokens=10, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    third = free.token_ids[2]
    by_id = engine.generate(["hello"], ["a"], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[third],
                                                            ignore_eos=True))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(third) + 1]
    engine.shutdown()


def test_context_end_finishes_with_length(llama_model, registry):
    engine = Engine(llama_model, registry=registry, max_context=20)
    res = engine.generate([[5] * 15], ["a"], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 5
    assert torch.is_tensor(torch.tensor(res.token_ids))


def test_engine_decode_steps_run_the_layer_stack_in_one_call(llama_model, registry):
    """The engine's decode steps (its RowsKV, mixed adapters) take ``decode_stack`` (one kernel call for every
    layer) and give what each request gives alone through generate (transformers' cache: the layer calls)."""
    from loramux import decode_stack

    if decode_stack._KERNEL is None:
        pytest.skip("no decode GEMM kernel on this machine: nothing to stack")
    real, calls = decode_stack._KERNEL, []

    class Counting:
        def __getattr__(self, name):
            if name == "decode_stack":
                calls.append(1)
            return getattr(real, name)

    engine = Engine(llama_model, registry=registry, max_running=4)
    prompts, adapters = [[5, 17, 33, 40], [7, 8, 9], [61, 7, 20, 21, 22]], [None, "a", "b"]
    decode_stack._KERNEL = Counting()
    try:
        outs = engine.generate(prompts, adapters, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    finally:
        decode_stack._KERNEL = real
        engine.shutdown()
    assert len(calls) >= 5  # every decode step after the prefills (6 tokens: at least 5 decode steps)
    for prompt, adapter, out in zip(prompts, adapters, outs):
        assert out.token_ids == solo_greedy(llama_model, prompt, adapter, 6), adapter
