"""One request's fault is that request's alone: injected faults in one row, the other rows' tokens
compared with a run without the faulty request (issue 11, section 1)."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import CharTokenizer, run_all
from loramux.engine import Engine, FailureKind, SamplingParams
from loramux.engine import sampling as sampling_mod

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_k=30, seed=5, ignore_eos=True)


class EvenTokens:
    """An innocent constraint: only even token ids (stacked with a faulty constrained row's mask)."""

    def allowed(self, vocab_size: int) -> torch.Tensor:
        return torch.arange(vocab_size) % 2 == 0

    def accept(self, token_id: int) -> None:
        assert token_id % 2 == 0

    def is_finished(self) -> bool:
        return False


EVEN = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, constraint=EvenTokens)
INNOCENT = [("g1", [3, 4, 5, 6], "a", GREEDY), ("g2", [7, 8, 9], None, GREEDY), ("g3", [10, 11], "b", SEEDED),
            ("g4", [12, 13, 14], "a", GREEDY), ("g5", [15, 16], "b", EVEN)]
POISON = 95  # the fake model answers NaN logits for a row whose input ends with this token
EXPLODE = 90  # the fake tokenizer raises when asked to decode this token


class ExplodingTokenizer(CharTokenizer):
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if EXPLODE in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return super().decode(ids, skip_special_tokens)


def _run(model, registry, bad=None, **engine_kw):
    engine = Engine(model, ExplodingTokenizer(), registry=registry, max_running=8, **engine_kw)
    specs = list(INNOCENT)
    if bad is not None:
        specs.insert(2, bad)  # in the middle of the batch, between rows of other adapters
    handles = {rid: engine.submit(prompt, adapter, params, request_id=rid) for rid, prompt, adapter, params in specs}
    run_all(engine, list(handles.values()))
    return engine, {rid: h.result() for rid, h in handles.items()}


@pytest.fixture
def poisoned_model(llama_model, monkeypatch):
    real = llama_model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        bad = kwargs["input_ids"][:, -1] == POISON  # (B,)
        if bool(bad.any()):
            out.logits[bad] = float("nan")
        return out

    monkeypatch.setattr(llama_model, "forward", forward)
    return llama_model


def _assert_isolated(reference, results, bad_id="bad"):
    bad = results[bad_id]
    assert bad.finish_reason == "error" and bad.failure.kind is FailureKind.ROW_FAILED and bad.error
    for rid in reference:
        assert results[rid].finish_reason == "length", (rid, results[rid].error)
        assert results[rid].token_ids == reference[rid].token_ids, rid


class RaisingConstraint:
    """Allows every token; raises on its ``fail_at``-th call to ``allowed``."""

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def allowed(self, vocab_size: int) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected constraint fault")
        return torch.ones(vocab_size, dtype=torch.bool)

    def accept(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


FAULTS = {
    # NaN logits in the shared decode forward: the bias makes its first token POISON, so its next input is
    "nan_logits_in_decode": SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logit_bias={POISON: 100}),
    # the detokenizer raises on its first token
    "detokenizer": SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logit_bias={EXPLODE: 100}),
    # the constraint raises in the third step (a decode step shared with the others)
    "constraint": SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, constraint=lambda: RaisingConstraint(3)),
    "constraint_factory": SamplingParams(max_tokens=8, temperature=0, constraint=lambda: 1 / 0),
    "constraint_bad_mask": SamplingParams(max_tokens=8, temperature=0.5, constraint=lambda: _BadMask()),
    # greedy constrained rows pick among their allowed ids in numpy (sampling._pick_one): still one row's fault
    "constraint_bad_mask_greedy": SamplingParams(max_tokens=8, temperature=0, constraint=lambda: _BadMask()),
    "constraint_empty_mask_greedy": SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                   constraint=lambda: _EmptyMask()),
    "stop_strings": SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=["zz"], logit_bias={EXPLODE: 100}),
}


class _BadMask(RaisingConstraint):
    def __init__(self) -> None:
        super().__init__(fail_at=-1)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        return torch.ones(vocab_size + 1, dtype=torch.bool)  # wrong shape


class _EmptyMask(RaisingConstraint):
    """Allows every token twice, then none."""

    def __init__(self) -> None:
        super().__init__(fail_at=-1)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        self.calls += 1
        return torch.full((vocab_size,), self.calls <= 2, dtype=torch.bool)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_row_fault_fails_only_its_request(poisoned_model, registry, fault):
    _, reference = _run(poisoned_model, registry)
    engine, results = _run(poisoned_model, registry, bad=("bad", [20, 21, 22], "b", FAULTS[fault]))
    _assert_isolated(reference, results)
    assert engine.stats()["running"] == 0 and engine.cache.pins("b") == 0


def test_a_sampling_fault_in_one_row_fails_only_it(llama_model, registry, monkeypatch):
    real = sampling_mod._pick_one

    def pick(row, seq):
        if seq.req.request_id == "bad" and len(seq.output_ids) == 2:
            raise RuntimeError("injected sampling fault")
        return real(row, seq)

    monkeypatch.setattr(sampling_mod, "_pick_one", pick)
    _, reference = _run(llama_model, registry)
    _, results = _run(llama_model, registry, bad=("bad", [20, 21], "a", SamplingParams(max_tokens=8, temperature=0.7)))
    _assert_isolated(reference, results)
    assert len(results["bad"].token_ids) == 2  # what it produced before the fault is kept


def test_tiny_temperature_is_greedy_not_an_error(llama_model, registry):
    _, reference = _run(llama_model, registry, bad=("bad", [20, 21], None, GREEDY))
    _, results = _run(llama_model, registry,
                      bad=("bad", [20, 21], None, SamplingParams(max_tokens=8, temperature=1e-300, ignore_eos=True)))
    assert {rid: r.token_ids for rid, r in results.items()} == {rid: r.token_ids for rid, r in reference.items()}


def test_a_failed_prefill_forward_fails_that_request_only(llama_model, registry, monkeypatch):
    real = llama_model.forward

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1 and int(kwargs["input_ids"][0, 0]) == 30:  # that request's prompt
            raise RuntimeError("injected out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(llama_model, "forward", forward)
    _, reference = _run(llama_model, registry)
    _, results = _run(llama_model, registry, bad=("bad", [30, 31, 32], "a", GREEDY))
    assert results["bad"].failure.kind is FailureKind.MODEL_ERROR and "injected out of memory" in results["bad"].error
    assert {rid: results[rid].token_ids for rid in reference} == {rid: r.token_ids for rid, r in reference.items()}


def test_a_failed_decode_forward_fails_its_rows_and_the_engine_keeps_serving(llama_model, registry, monkeypatch):
    real = llama_model.forward
    armed = {"left": 1, "rows": 0}

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 1 and armed["left"]:
            armed["left"], armed["rows"] = 0, kwargs["input_ids"].shape[0]
            raise RuntimeError("injected shared-forward fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(llama_model, "forward", forward)
    engine, results = _run(llama_model, registry)
    failed = [r for r in results.values() if r.finish_reason == "error"]
    assert len(failed) == armed["rows"] > 1  # exactly the rows of that forward
    assert all(r.failure.kind is FailureKind.MODEL_ERROR for r in failed)
    assert all(r.finish_reason == "length" for r in results.values() if r not in failed)
    after = engine.generate([[3, 4, 5, 6]], ["a"], GREEDY)[0]  # the loop goes on serving
    alone = Engine(llama_model, registry=registry).generate([[3, 4, 5, 6]], ["a"], GREEDY)[0]
    assert after.finish_reason == "length" and after.token_ids == alone.token_ids
    stats = engine.stats()
    assert stats["running"] == 0 and stats["kv_bytes"] == 0 and engine.cache.pins("a") == 0


def test_a_failed_load_carries_a_typed_failure(llama_model, registry, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    registry.register("broken", tmp_path)
    _, reference = _run(llama_model, registry)
    _, results = _run(llama_model, registry, bad=("bad", [3, 4], "broken", GREEDY))
    assert results["bad"].failure.kind is FailureKind.ADAPTER_LOAD_FAILED
    assert {rid: results[rid].token_ids for rid in reference} == {rid: r.token_ids for rid, r in reference.items()}
