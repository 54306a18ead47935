"""Weight-only int8 base (loramux.quantize): the kernel's int8 variant equals its torch reference, a row's
result is independent of the batch, a tied vocabulary projection shares the embedding's int8 rows, adapters
still route per row, and merging into int8 is refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loramux import MultiLoraModel, dense_kernel
from loramux.errors import MergedAdapterError
from loramux.quantize import Int8Embedding, Int8Linear, quantize_model, quantize_weight

from lora_fixtures import make_adapter, tiny_llama



@pytest.fixture
def kernel(decode_gemm_kernel):  # tests/conftest.py: built once, fails (not skips) where it should build
    return decode_gemm_kernel


def test_quantize_weight_round_trips_within_half_a_step():
    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    w[3] = 0                                                        # an all-zero row keeps scale 1
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (37,) and q.abs().max() <= 127
    assert scale[3] == 1 and torch.all(q[3] == 0)
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("d_out,d_in", [(64, 64), (13, 37), (3, 5), (577, 1536), (6, 129)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_kernel_equals_its_reference(kernel, d_out, d_in, bias):
    g = torch.Generator().manual_seed(d_out + d_in)
    q, scale = quantize_weight(torch.randn(d_out, d_in, generator=g))
    b = torch.randn(d_out, generator=g) if bias else None
    w = q.float() * scale[:, None]
    for m in (1, 2, 3, 4, 6, 7, 16, 33):
        x = torch.randn(m, d_in, generator=g)
        got = kernel.int8_linear(x, q, scale, b, 64)
        torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5 * d_in ** 0.5, rtol=1e-5, msg=f"M={m}")
    x = torch.randn(65, d_in, generator=g)                          # prefill-sized: dequantized, MKL
    assert torch.equal(kernel.int8_linear(x, q, scale, b, 64), F.linear(x, w, b))  # the same float copy of W


def test_int8_rows_do_not_depend_on_the_batch_or_threads(kernel):
    """A row alone (its own 8-row tile shape, with the prefetch) gives the bits it gets in a batch, with and without
    a bias, over a K tail and a tail tile of W rows, on 1 and 2 threads."""
    g = torch.Generator().manual_seed(1)
    saved = torch.get_num_threads()
    try:
        for d_out, d_in, bias in ((301, 576, False), (13, 37, True)):
            q, scale = quantize_weight(torch.randn(d_out, d_in, generator=g))
            b = torch.randn(d_out, generator=g) if bias else None
            x = torch.randn(20, d_in, generator=g)
            out = {}
            for n in (1, 2):
                torch.set_num_threads(n)
                out[n] = kernel.int8_linear(x, q, scale, b, 64)
                for i in (0, 7, 19):
                    assert torch.equal(kernel.int8_linear(x[i:i + 1], q, scale, b, 64), out[n][i:i + 1]), (d_in, n, i)
            assert torch.equal(out[1], out[2])
    finally:
        torch.set_num_threads(saved)


def test_int8_kernel_rejects_bad_scales(kernel):
    q, _ = quantize_weight(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match=r"scale must be a contiguous float32 \(8,\)"):
        kernel.int8_linear(torch.randn(2, 16), q, torch.ones(9), None, 64)


def test_quantized_tied_model_shares_rows_and_stays_close():
    plain = tiny_llama(seed=2, tie_word_embeddings=True)
    model = copy.deepcopy(plain)
    n = quantize_model(model)
    linears = [m for m in plain.modules() if type(m) is nn.Linear]
    assert n == len(linears)
    head, emb = model.lm_head, model.model.embed_tokens
    assert type(head) is Int8Linear and type(emb) is Int8Embedding and isinstance(head, nn.Linear)
    assert head.qweight is emb.qweight and head.wscale is emb.wscale          # one int8 copy for both
    assert all(p.dtype == torch.float32 for p in model.parameters())          # norms only; no fp32 W left
    assert not any(n.endswith(".weight") and p.dim() == 2 for n, p in model.named_parameters())
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected, got = plain(input_ids=ids).logits, model(input_ids=ids).logits
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.05, f"int8 logits {rel:.3f} away from fp32 (relative L2)"
    with pytest.raises(TypeError, match="cannot be assigned"):
        head.weight = torch.zeros(3)


def test_torch_path_without_the_kernel_equals_the_kernel(monkeypatch):
    model = tiny_llama(seed=4)
    quantize_model(model)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        with_kernel = model(input_ids=ids).logits
        monkeypatch.setattr(dense_kernel, "_state", {"module": None})
        without = model(input_ids=ids).logits
    torch.testing.assert_close(without, with_kernel, atol=1e-5, rtol=1e-5)


def test_adapters_on_an_int8_base_route_per_row_and_refuse_merging(tmp_path):
    base = tiny_llama(seed=5)
    paths = {n: make_adapter(base, tmp_path / n, seed=10 + i, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
             for i, n in enumerate(("a", "b"))}
    qbase = copy.deepcopy(base)
    quantize_model(qbase)
    lm = MultiLoraModel(qbase)
    for name, path in paths.items():
        lm.load_adapter(path, adapter_name=name)
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(6))
    rows = ["a", "__base__", "b"]
    with torch.inference_mode():
        mixed = lm(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            alone = lm(input_ids=ids[i:i + 1], adapter_names=[name]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mixed[0], lm(input_ids=ids[:1], adapter_names=["__base__"]).logits[0], atol=1e-3)
    with pytest.raises(MergedAdapterError, match="int8 base"):
        lm.merge_adapter("a")


def test_memory_report_counts_an_int8_base_by_its_int8_bytes():
    """The int8 weights and scales are buffers, not parameters: the report must count them (once each,
    though lm_head and the tied embedding share them), or it shows an int8 base as its norms alone."""
    plain = tiny_llama(seed=2, tie_word_embeddings=True)
    fp32 = MultiLoraModel(copy.deepcopy(plain)).memory_report()["base_bytes"]
    qbase = copy.deepcopy(plain)
    quantize_model(qbase)
    int8 = MultiLoraModel(qbase).memory_report()["base_bytes"]
    weights = sum(m.qweight.numel() + 4 * m.wscale.numel() for m in qbase.modules()
                  if isinstance(m, Int8Linear))                   # lm_head is tied: counted here once
    assert weights <= int8 < fp32 / 2, (int8, fp32, weights)


def test_an_int8_base_gets_the_fused_norms_and_the_decode_attention(decode_gemm_kernel):
    """Its linears are Int8Linear (already the kernel), but install() still switches its norms and attention."""
    from loramux import MultiLoraModel, decode_attention
    from loramux.quantize import quantize_model

    from lora_fixtures import tiny_llama

    plain = tiny_llama(seed=6)
    base = copy.deepcopy(plain)
    quantize_model(base)
    lm = MultiLoraModel(base)
    assert lm.base_model.config._attn_implementation == decode_attention.ATTN_NAME
    assert type(lm.base_model.model.norm).__name__.startswith("Fused")
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache = lm(input_ids=ids[:, :5], use_cache=True).past_key_values
        step = lm(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True).logits
        want = plain(input_ids=ids).logits[:, 5:]
    assert (step - want).abs().max() < 0.05 * want.abs().max()  # int8 weights: close, not fp32-equal


def test_loading_an_adapter_on_an_int8_base_dequantizes_nothing(tmp_path, monkeypatch):
    """An int8 layer's ``weight`` is a dequantized copy of the whole matrix: an adapter load (on the engine's
    loader thread, beside decode steps) must read shapes, dtype and device without it."""
    from loramux import quantize

    base = tiny_llama(seed=5)
    path = make_adapter(base, tmp_path / "a", seed=11, r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    qbase = copy.deepcopy(base)
    quantize_model(qbase)
    lm = MultiLoraModel(qbase)
    calls = []
    real = quantize._dequantized
    monkeypatch.setattr(quantize, "_dequantized", lambda q, s: calls.append(q.shape) or real(q, s))
    info = lm.load_adapter(path, adapter_name="a")
    assert calls == [] and info.nbytes > 0
    monkeypatch.undo()
    reference = MultiLoraModel(copy.deepcopy(base))
    reference.load_adapter(path, adapter_name="a")
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():  # the same LoRA delta on both bases: the logits differ by the int8 rounding only
        delta_q = lm(input_ids=ids, adapter_names=["a", "a"]).logits - lm(input_ids=ids, adapter_names=["__base__"] * 2).logits
        delta_f = (reference(input_ids=ids, adapter_names=["a", "a"]).logits
                   - reference(input_ids=ids, adapter_names=["__base__"] * 2).logits)
    assert delta_q.abs().max() > 1e-3
    torch.testing.assert_close(delta_q, delta_f, atol=0.05, rtol=0.05)
