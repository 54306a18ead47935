"""The prefix cache: reused for the same adapter load and leading tokens only, never across a reload;
greedy output identical with and without it; bounded by bytes."""
from __future__ import annotations

import random

import torch

from engine_helpers import VOCAB, run_all
from loramux.engine import Engine, SamplingParams
from loramux.engine.prefix_cache import PrefixCache, common_prefix

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SYSTEM = [5, 17, 33, 40, 61, 7, 8, 9, 10, 11, 12, 13]  # a shared "system prompt"


def _chats(seed: int, n: int = 12):
    rng = random.Random(seed)
    return [(SYSTEM + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 8))], rng.choice([None, "a", "b"]))
            for _ in range(n)]


def _serve(engine, reqs, wave: int = 3):
    """Submit in waves of ``wave`` (so later waves can reuse what earlier ones left)."""
    out = []
    for i in range(0, len(reqs), wave):
        handles = [engine.submit(p, a, GREEDY) for p, a in reqs[i: i + wave]]
        out += [r.token_ids for r in run_all(engine, handles)]
    return out


def test_greedy_output_is_identical_with_and_without_the_cache(llama_model, registry):
    reqs = _chats(0)
    cold = Engine(llama_model, registry=registry, prefix_cache_bytes=0, prefill_chunk=8)
    warm = Engine(llama_model, registry=registry, prefill_chunk=8)
    assert _serve(cold, reqs) == _serve(warm, reqs)
    stats, cold_stats = warm.stats(), cold.stats()
    assert cold_stats["prefix_cache_hit_tokens"] == 0 and cold_stats["prefix_cache_entries"] == 0
    assert stats["prefix_cache_hit_tokens"] >= len(SYSTEM) * 6  # 12 requests over 3 owners, 3 per wave
    assert stats["prompt_tokens"] == cold_stats["prompt_tokens"] - stats["prefix_cache_hit_tokens"]
    assert stats["prefix_cache_entries"] > 0 and stats["prefix_cache_bytes"] > 0


def test_only_the_suffix_is_prefilled(llama_model, registry):
    engine = Engine(llama_model, registry=registry)
    run_all(engine, [engine.submit(SYSTEM + [20, 21], "a", GREEDY)])
    before = engine.stats()
    run_all(engine, [engine.submit(SYSTEM + [30, 31, 32], "a", GREEDY)])
    after = engine.stats()
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == len(SYSTEM)
    assert after["prompt_tokens"] - before["prompt_tokens"] == 3
    # another adapter, or the base model, shares nothing with "a"
    run_all(engine, [engine.submit(SYSTEM + [30, 31, 32], "b", GREEDY), engine.submit(SYSTEM + [30], None, GREEDY)])
    assert engine.stats()["prefix_cache_hit_tokens"] == after["prefix_cache_hit_tokens"]


def test_a_reload_under_the_same_name_never_reuses_old_kv(llama_model, registry):
    prompt = SYSTEM + [20, 21]
    engine = Engine(llama_model, registry=registry)
    first = run_all(engine, [engine.submit(prompt, "a", GREEDY)])[0].token_ids
    assert engine.stats()["prefix_cache_entries"] == 1
    registry.register("a", registry.path_of("b"))  # same name, new weights: the cache reloads it
    again = run_all(engine, [engine.submit(prompt, "a", GREEDY)])[0].token_ids
    assert engine.stats()["prefix_cache_hit_tokens"] == 0  # the entry of the old load was not used
    fresh = Engine(llama_model, registry=registry, prefix_cache_bytes=0)
    assert again == run_all(fresh, [fresh.submit(prompt, "b", GREEDY)])[0].token_ids != first
    # a reload behind the engine's back (the model's own load_adapter, replace=True) is caught too
    llama_model.load_adapter(registry.path_of("c"), adapter_name="a", replace=True)
    hits = engine.stats()["prefix_cache_hit_tokens"]
    run_all(engine, [engine.submit(prompt, "a", GREEDY)])
    assert engine.stats()["prefix_cache_hit_tokens"] == hits


def test_prompt_logprobs_requests_bypass_the_cache(llama_model, registry):
    engine = Engine(llama_model, registry=registry)
    run_all(engine, [engine.submit(SYSTEM + [20], None, GREEDY)])
    res = run_all(engine, [engine.submit(SYSTEM + [21], None, SamplingParams(max_tokens=2, temperature=0,
                                                                              prompt_logprobs=1))])[0]
    assert engine.stats()["prefix_cache_hit_tokens"] == 0 and len(res.prompt_logprobs) == len(SYSTEM) + 1


def _kv(tokens: int, layers: int = 2):
    return [(torch.full((1, 2, tokens, 4), float(i)), torch.zeros(1, 2, tokens, 4)) for i in range(layers)]


def test_the_cache_is_bounded_by_bytes_lru_first_out():
    one = sum(k.numel() * 4 + v.numel() * 4 for k, v in _kv(10))
    cache = PrefixCache(max_bytes=2 * one)
    owner = object()
    for first in (3, 4, 5):
        cache.insert(owner, [first] + [9] * 9, _kv(10))
    assert len(cache) == 2 and cache.bytes <= 2 * one
    assert cache.lookup(owner, [3] + [9] * 9 + [1]) is None  # the oldest left
    hit = cache.lookup(owner, [4] + [9] * 5 + [1])
    assert hit is not None and hit[0] == 6 and hit[1][0][0].shape == (1, 2, 6, 4)
    assert cache.lookup(object(), [4] + [9] * 9 + [1]) is None  # another owner: nothing
    cache.insert(owner, [4] + [9] * 9 + [7, 7], _kv(12))  # extends the [4, 9...] entry: replaces it
    assert cache.covers(owner, [4] + [9] * 9) and cache.bytes <= 2 * one  # [5, 9...] made room
    assert cache.lookup(owner, [4] + [9] * 9)[0] == 9  # the last prompt token is always fed
    assert PrefixCache(0).lookup(owner, [1, 2]) is None


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2
    assert common_prefix([5], [1], 5) == 0
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        b = [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        expect = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b, 99) == expect


def _count_forwards(engine) -> list[tuple[int, int]]:
    """Record the (rows, tokens) shape of every model forward the engine's stepper runs."""
    shapes, forward = [], engine._stepper._forward

    def counted(kv, input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(kv, input_ids, *args, **kwargs)

    engine._stepper._forward = counted
    return shapes


def test_a_cached_prompt_joins_the_decode_step_without_a_forward_of_its_own(llama_model, registry):
    prompt, other = SYSTEM + [20, 21], SYSTEM[:3] + [50, 51, 52]
    long = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = Engine(llama_model, registry=registry)
    alone = run_all(engine, [engine.submit(prompt, "a", GREEDY)])[0].token_ids
    solo_other = Engine(llama_model, registry=registry, prefix_cache_bytes=0)
    other_alone = run_all(solo_other, [solo_other.submit(other, "b", long)])[0].token_ids
    shapes = _count_forwards(engine)
    busy = engine.submit(other, "b", long)
    while not engine._stepper.batch:  # its prefill ran: it decodes from the next step on
        engine.step()
    hits = engine.stats()["prefix_cache_hit_tokens"]
    shapes.clear()
    again = engine.submit(prompt, "a", GREEDY)
    steps = 0
    while not again.finished:
        assert engine.step()
        steps += 1
    assert engine.stats()["prefix_cache_hit_tokens"] - hits == len(prompt) - 1
    assert shapes == [(2, 1)] * steps  # one decode forward a step, over both rows: no prefill forward
    assert again.result().token_ids == alone
    assert run_all(engine, [busy])[0].token_ids == other_alone


def test_requests_admitted_together_reuse_what_the_first_of_them_prefilled(llama_model, registry):
    prompt = SYSTEM + [20, 21]
    engine = Engine(llama_model, registry=registry)
    shapes = _count_forwards(engine)
    outs = run_all(engine, [engine.submit(prompt, "a", GREEDY) for _ in range(3)])
    cold = Engine(llama_model, registry=registry, prefix_cache_bytes=0)
    expected = run_all(cold, [cold.submit(prompt, "a", GREEDY)])[0].token_ids
    assert [o.token_ids for o in outs] == [expected] * 3
    assert engine.stats()["prefix_cache_hit_tokens"] == 2 * (len(prompt) - 1)
    assert [s for s in shapes if s[1] > 1] == [(1, len(prompt) - 1)]  # one prefill: the first request's


def test_one_token_prompts_and_prompt_logprobs_still_pick_from_the_prefill(llama_model, registry):
    engine = Engine(llama_model, registry=registry)
    shapes = _count_forwards(engine)
    res = run_all(engine, [engine.submit([7], None, GREEDY)])[0]
    assert shapes[0] == (1, 1) and len(shapes) == GREEDY.max_tokens  # prefill gives token 1; 5 decodes
    cold = Engine(llama_model, registry=registry, prefix_cache_bytes=0)
    assert res.token_ids == run_all(cold, [cold.submit([7], None, GREEDY)])[0].token_ids
    shapes.clear()
    with_lp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1)
    run_all(engine, [engine.submit(SYSTEM, None, with_lp)])
    assert shapes == [(1, len(SYSTEM)), (1, 1)]  # the whole prompt, then one decode
