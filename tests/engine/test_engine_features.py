"""n > 1, logprobs, prompt logprobs, logit_bias and the constraint hook, each checked against solo runs."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import CharTokenizer, run_all, solo_greedy
from loramux.engine import Engine, SamplingParams


def _engine(model, registry, **kw):
    return Engine(model, CharTokenizer(), registry=registry, max_running=8, **kw)


def _load(model, registry, name):
    if name is not None and name not in model.adapters:
        model.load_adapter(registry.path_of(name), adapter_name=name)


def test_n3_greedy_equals_three_solo_runs_and_prefills_once(llama_model, registry):
    engine = _engine(llama_model, registry)
    prompt = [5, 17, 33, 40, 61]
    handle = engine.submit(prompt, "a", SamplingParams(n=3, max_tokens=7, temperature=0, ignore_eos=True))
    run_all(engine, [handle])
    finals = handle.results()
    _load(llama_model, registry, "a")
    solo = solo_greedy(llama_model, prompt, "a", 7)
    assert [f.index for f in finals] == [0, 1, 2] and all(f.token_ids == solo for f in finals)
    assert handle.result() is finals[0]
    assert engine.stats()["prompt_tokens"] == len(prompt)  # the prompt was fed once, not three times
    assert engine.stats()["running"] == 0 and engine.cache.pins("a") == 0


def test_seeded_n2_sequence_i_equals_solo_with_seed_plus_i(llama_model, registry):
    prompt = [4, 9, 22, 31]
    params = dict(max_tokens=10, temperature=0.9, top_k=40, ignore_eos=True)
    engine = _engine(llama_model, registry)
    many = engine.submit(prompt, "b", SamplingParams(n=2, seed=100, **params))
    others = [engine.submit([7] * (i + 2), a, SamplingParams(max_tokens=5, temperature=1.0)) for i, a in enumerate("ac")]
    run_all(engine, [many, *others])
    solo = [_engine(llama_model, registry).generate([prompt], ["b"], SamplingParams(seed=100 + i, **params))[0]
            for i in range(2)]
    assert [f.token_ids for f in many.results()] == [s.token_ids for s in solo]
    assert solo[0].token_ids != solo[1].token_ids  # the two streams differ


def test_each_sequence_finishes_on_its_own(llama_model, registry):
    made = []

    class StopAfter:
        def __init__(self, k):
            self.k, self.seen = k, 0

        def allowed(self, vocab_size):
            return torch.ones(vocab_size, dtype=torch.bool)

        def accept(self, token_id):
            self.seen += 1

        def is_finished(self):
            return self.seen >= self.k

    def factory():
        made.append(StopAfter(len(made) + 1))  # sequence i stops after i + 1 tokens
        return made[-1]

    engine = _engine(llama_model, registry)
    handle = engine.submit([3, 4, 5], None, SamplingParams(n=3, max_tokens=10, temperature=0, ignore_eos=True,
                                                          constraint=factory))
    finished_order = []
    for _ in range(100):
        if handle.finished:
            break
        engine.step()
        while handle._deltas:
            out = handle._deltas.popleft()
            if out.finished:
                finished_order.append(out.index)
    finals = handle.results()
    assert [len(f.token_ids) for f in finals] == [1, 2, 3] and finished_order == [0, 1, 2]
    assert all(f.finish_reason == "stop" for f in finals)


def _solo_logits(model, ids, adapter):
    """log_softmax of MultiLoraModel's logits over ``ids`` in one forward: (T, V)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), adapter_names=[adapter or "__base__"]).logits[0]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("adapter", [None, "c"])
def test_logprobs_and_prompt_logprobs_equal_the_models_log_softmax(llama_model, registry, adapter):
    prompt = [6, 12, 40, 41, 7, 19]
    engine = _engine(llama_model, registry, prefill_chunk=4)  # the prompt spans two chunks
    res = engine.generate([prompt], [adapter], SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True,
                                                              logprobs=3, prompt_logprobs=2))[0]
    _load(llama_model, registry, adapter)
    ref = _solo_logits(llama_model, prompt + res.token_ids, adapter)  # (P + N, V)
    assert len(res.logprobs) == len(res.token_ids) == 5
    for j, lp in enumerate(res.logprobs):
        row = ref[len(prompt) - 1 + j]
        assert lp.token_id == res.token_ids[j]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        lp = res.prompt_logprobs[t]
        assert lp.token_id == prompt[t] and lp.logprob == pytest.approx(float(ref[t - 1, prompt[t]]), abs=1e-4)
        assert len(lp.top) == 2


def test_rows_without_logprobs_get_none(llama_model, registry):
    res = _engine(llama_model, registry).generate([[3, 4]], [None], SamplingParams(max_tokens=3, temperature=0))[0]
    assert res.logprobs is None and res.prompt_logprobs is None


def test_logit_bias_steers_only_its_row(llama_model, registry):
    prompt = [8, 9, 10]
    plain = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine = _engine(llama_model, registry)
    handles = [engine.submit(prompt, "a", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                         logit_bias={50: 100.0})),
               engine.submit(prompt, "a", plain)]
    biased, unbiased = [r.token_ids for r in run_all(engine, handles)]
    _load(llama_model, registry, "a")
    solo = solo_greedy(llama_model, prompt, "a", 4)
    assert biased == [50] * 4 and unbiased == solo
    banned = solo[0]
    res = engine.generate([prompt], ["a"], SamplingParams(max_tokens=1, temperature=0, logit_bias={banned: -100.0}))[0]
    assert res.token_ids[0] != banned


def test_logit_bias_ids_are_checked_against_the_vocab(llama_model, registry):
    from loramux.engine import RequestRejected

    with pytest.raises(RequestRejected, match="vocab"):
        _engine(llama_model, registry).submit([3], None, SamplingParams(logit_bias={96: 1.0}))


def test_a_constraint_mask_limits_the_tokens(llama_model, registry):
    allowed_ids = [20, 21, 22]

    class Only:
        def __init__(self):
            self.n = 0

        def allowed(self, vocab_size):
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[allowed_ids] = True
            return mask

        def accept(self, token_id):
            assert token_id in allowed_ids
            self.n += 1

        def is_finished(self):
            return self.n == 4

    res = _engine(llama_model, registry).generate([[3, 4]], ["d"], SamplingParams(max_tokens=10, temperature=1.0, seed=1,
                                                                                    constraint=Only))[0]
    assert res.finish_reason == "stop" and len(res.token_ids) == 4 and set(res.token_ids) <= set(allowed_ids)


def test_n_too_large_for_the_limits_is_refused(llama_model, registry):
    from loramux.engine import RequestRejected

    with pytest.raises(RequestRejected, match="lower n"):
        Engine(llama_model, registry=registry, max_running=2).submit([3], None, SamplingParams(n=3))


def test_cancelling_an_n3_request_ends_every_sequence(llama_model, registry):
    engine = _engine(llama_model, registry)
    handle = engine.submit([3, 4], "a", SamplingParams(n=3, max_tokens=50, temperature=0, ignore_eos=True))
    for _ in range(100):
        if len(engine.batch) == 3:
            break
        engine.step()
    handle.cancel()
    engine.step()
    assert [f.finish_reason for f in handle.results(timeout=0)] == ["abort"] * 3
    assert len(engine.batch) == 0 and engine.cache.pins("a") == 0 and engine.stats()["running_sequences"] == 0
