"""Moving the base weights onto huge pages (``huge_pages.py``): same values, Parameter objects, ties and
outputs; separate storages (``save_pretrained`` still works); aliasing storages left alone; off when asked."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from loramux import huge_pages

from lora_fixtures import tiny_llama


@pytest.fixture
def on(monkeypatch):
    if not huge_pages.available():
        pytest.skip("transparent huge pages are off on this machine (the move is then a no-op, tested below)")
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 4096)  # the tiny model's weights count as large


def test_weights_move_with_values_parameters_and_ties_unchanged(on, tmp_path):
    model = tiny_llama(seed=2, hidden_size=64, intermediate_size=96, tie_word_embeddings=True)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    params = dict(model.named_parameters())
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in params.items()}
    moved = huge_pages.move_weights(model)
    assert moved > 0
    for name, p in model.named_parameters():
        assert p is params[name] and torch.equal(p, before[name][1])
    changed = [n for n, p in model.named_parameters() if p.data_ptr() != before[n][0]]
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.norm.weight" not in changed  # 256 B: stays
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    storages = [p.untyped_storage().data_ptr() for n, p in model.named_parameters() if n in changed]
    assert len(set(storages)) == len(storages)  # one storage each: safetensors sees no shared tensors
    assert all(p.data_ptr() % huge_pages.ALIGN == 0 for n, p in model.named_parameters() if n in changed)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    assert huge_pages.move_weights(model) == 0  # once per model
    model.save_pretrained(tmp_path / "saved")
    reloaded = type(model).from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, want)


def test_int8_buffers_move_and_shared_ones_stay_shared(on):
    from loramux.quantize import quantize_model

    model = tiny_llama(seed=3, hidden_size=64, intermediate_size=96, tie_word_embeddings=True)
    quantize_model(model)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    old = model.lm_head.qweight.data_ptr()
    assert huge_pages.move_weights(model) > 0
    assert model.lm_head.qweight.data_ptr() != old and model.lm_head.qweight is model.model.embed_tokens.qweight
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_tensors_sharing_a_storage_stay_where_they_are(on):
    flat = torch.randn(2 * 64 * 64)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    model[0].weight.data = flat[: 64 * 64].view(64, 64)
    model[1].weight.data = flat[64 * 64:].view(64, 64)
    ptrs = [m.weight.data_ptr() for m in model]
    huge_pages.move_weights(model)
    assert [m.weight.data_ptr() for m in model][:2] == ptrs[:2] and model[2].weight.data_ptr() != ptrs[2]


def test_off_when_disabled(monkeypatch):
    monkeypatch.setenv("LORAMUX_HUGE_PAGES", "0")
    model = tiny_llama(seed=4)
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert not huge_pages.available() and huge_pages.move_weights(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == ptrs
