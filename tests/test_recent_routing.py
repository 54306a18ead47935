"""Consecutive calls with the same ``adapter_names`` share one resolution (``routing.RecentRouting``): decode steps
build each layer's grouped-LoRA arguments once, the outputs are those of a fresh resolution, and a replaced,
deleted, re-merged or freed adapter is never served from the kept rows."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from loramux import MultiLoraModel, UnknownAdapterError
from loramux.engine.kv import RowsKV
from loramux.errors import MergedAdapterError
from loramux.layers import LoraLayer

from lora_fixtures import make_adapter, tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = ["a", None, "b", "a"]


@pytest.fixture
def paths(tmp_path):
    base = tiny_llama(seed=3)
    return {"a": make_adapter(base, tmp_path / "a", seed=4, r=4, lora_alpha=8, target_modules=ALL_LINEAR),
            "b": make_adapter(base, tmp_path / "b", seed=5, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "c": make_adapter(base, tmp_path / "c", seed=6, r=4, lora_alpha=8, target_modules=ALL_LINEAR)}


@pytest.fixture
def lm(paths):
    model = MultiLoraModel(tiny_llama(seed=3))
    model.load_adapter(paths["a"], adapter_name="a")
    model.load_adapter(paths["b"], adapter_name="b")
    return model


IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20]])


def logits(lm, names):
    with torch.inference_mode():
        return lm(input_ids=IDS, adapter_names=names).logits


def fresh(lm, rows=ROWS):
    """The same rows resolved anew (prepare_routing never reuses a resolution)."""
    return logits(lm, lm.prepare_routing(rows))


def decode_steps(lm, names_of_step, steps: int = 3) -> list[torch.Tensor]:
    """Prefill IDS into a RowsKV, then ``steps`` one-token steps, step i routed by ``names_of_step(i)``."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(IDS.shape, dtype=torch.long)
    cache, out = RowsKV(), []
    with torch.inference_mode():
        lm(input_ids=IDS, attention_mask=mask, past_key_values=cache, use_cache=True, adapter_names=names_of_step(-1))
        for i in range(steps):
            mask = torch.cat([mask, torch.ones(len(IDS), 1, dtype=torch.long)], dim=1)
            out.append(lm(input_ids=torch.randint(3, 96, (len(IDS), 1), generator=g), attention_mask=mask,
                          position_ids=mask.sum(1, keepdim=True) - 1, past_key_values=cache, use_cache=True,
                          adapter_names=names_of_step(i)).logits)
    return out


def test_decode_steps_given_the_same_names_build_the_layers_kernel_arguments_once(decode_gemm_kernel, lm, monkeypatch):
    # decode_delta: what the decode stack (the kernel path; tests/conftest.py skips without it) asks each layer
    built, before_call = [], []
    real = LoraLayer._decode_delta
    monkeypatch.setattr(LoraLayer, "_decode_delta", lambda self, *a: built.append(self) or real(self, *a))
    # a new list each call, as a caller's loop would pass; before_call: what was built before each call
    by_names = decode_steps(lm, lambda i: before_call.append(len(built)) or list(ROWS))
    prefill, step1, step2, step3 = before_call
    assert step1 == prefill and step2 > step1  # the first decode step builds every layer's arguments...
    assert len(built) == step3 == step2        # ...and the next two build none
    monkeypatch.setattr(LoraLayer, "_decode_delta", real)
    resolved_each_step = decode_steps(lm, lambda i: lm.prepare_routing(ROWS))
    for a, b in zip(by_names, resolved_each_step):
        assert torch.equal(a, b)


def test_the_kept_rows_are_not_served_after_a_replace_a_delete_or_another_merge(lm, paths):
    before = logits(lm, ROWS)
    assert torch.equal(logits(lm, ROWS), before)
    lm.load_adapter(paths["c"], adapter_name="a", replace=True)  # same name, new weights, new slot
    replaced = logits(lm, ROWS)
    assert torch.equal(replaced, fresh(lm))
    assert not torch.allclose(replaced[0], before[0]) and torch.equal(replaced[2], before[2])

    slot = lm.adapters["b"].slot
    lm.delete_adapter("b")
    with pytest.raises(UnknownAdapterError, match="'b'"):
        logits(lm, ROWS)
    lm.load_adapter(paths["a"], adapter_name="b")  # the freed slot again, other weights under the old name
    assert lm.adapters["b"].slot == slot
    reloaded = logits(lm, ROWS)
    assert torch.equal(reloaded, fresh(lm)) and not torch.allclose(reloaded[2], before[2])

    only_a = ["a"] * len(IDS)
    want_a = logits(lm, only_a)
    lm.merge_adapter("a")
    assert torch.allclose(logits(lm, only_a), want_a, atol=1e-5)
    lm.unmerge_adapter()
    lm.merge_adapter("b")
    with pytest.raises(MergedAdapterError, match="'b' is merged"):
        logits(lm, only_a)


def test_a_deleted_adapters_weights_are_not_kept_by_the_last_calls_rows(lm):
    decode_steps(lm, lambda i: ROWS, steps=1)  # its layers' kernel arguments hold the adapters' tensors
    layer = next(m for m in lm.modules() if isinstance(m, LoraLayer) and m.slots.get(lm.adapters["b"].slot) is not None)
    A = weakref.ref(layer.slots.get(lm.adapters["b"].slot).A)
    lm.delete_adapter("b")
    gc.collect()
    assert A() is None
    assert torch.equal(logits(lm, ["a", None, None, "a"]), fresh(lm, ["a", None, None, "a"]))
