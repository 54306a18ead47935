"""The one-token attention kernel (decode steps): equal to SDPA over odd shapes, masks and strided caches, a
row's result independent of the batch and of the thread count, the model within fp32 tolerance of plain
transformers (left-padded batches included), and transformers' SDPA for everything else."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from loramux import decode_attention, dense_kernel

from lora_fixtures import tiny_llama


@pytest.fixture
def kernel(decode_gemm_kernel):  # tests/conftest.py: built once, fails (not skips) where it should build
    return decode_gemm_kernel




def reference(q, k, v, mask, scale):
    """SDPA on the repeated kv heads: (B, Hq, 1, D) -> (B, 1, Hq, D)."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, scale=scale).transpose(1, 2)


def inputs(b, hq, hkv, length, d, seed, mask_kind="bool"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g)
    # keys/values as strided windows of larger buffers (the engine's KV layout: spare rows and columns)
    kbuf = torch.randn(b + 2, hkv, length + 5, d, generator=g)
    vbuf = torch.randn(b + 2, hkv, length + 5, d, generator=g)
    k, v = kbuf[1: b + 1, :, 3: 3 + length], vbuf[1: b + 1, :, 3: 3 + length]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, 1, length, generator=g) > 0.3
        mask[..., -1] = True  # the newest token is always real
    elif mask_kind == "shared":
        mask = torch.rand(1, 1, 1, length, generator=g) > 0.3
        mask[..., -1] = True
    elif mask_kind == "float":
        mask = torch.randn(b, 1, 1, length, generator=g)
        mask[..., : length // 3] = float("-inf")
    return q, k, v, mask


# (B, Hq, Hkv, L, D): the default model's heads (9 / 3, D 64), MHA, MQA, one cached position, odd D
# (13, 24: no full vector / not a register-resident width), D 8 and 128
SHAPES = [(1, 9, 3, 129, 64), (16, 9, 3, 33, 64), (3, 4, 4, 7, 13), (5, 8, 2, 1, 24), (2, 6, 1, 40, 8),
          (4, 4, 2, 17, 128), (1, 2, 1, 3, 5)]


@pytest.mark.parametrize("b,hq,hkv,length,d", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "shared", "float"])
def test_kernel_equals_sdpa(kernel, b, hq, hkv, length, d, mask_kind):
    q, k, v, mask = inputs(b, hq, hkv, length, d, seed=b * 100 + length, mask_kind=mask_kind)
    scale = d ** -0.5
    got = kernel.decode_attention(q, k, v, mask, scale)
    assert got.shape == (b, 1, hq, d)
    torch.testing.assert_close(got, reference(q, k, v, mask, scale), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_a_rows_result_does_not_depend_on_the_batch_or_threads(kernel, threads, n_threads):
    q, k, v, mask = inputs(7, 9, 3, 57, 64, seed=11)
    torch.set_num_threads(1)
    alone = [kernel.decode_attention(q[i: i + 1], k[i: i + 1], v[i: i + 1], mask[i: i + 1], 0.125) for i in range(7)]
    torch.set_num_threads(n_threads)
    together = kernel.decode_attention(q, k, v, mask, 0.125)
    for i in range(7):
        assert torch.equal(together[i: i + 1], alone[i])  # bit for bit


@pytest.mark.parametrize("n_threads", [2, 3])
def test_one_rows_heads_split_over_threads_give_the_one_thread_bits(kernel, threads, n_threads):
    """A B1 call's query heads are spread over the threads (a kv head's heads may land on two of them): each head
    is still computed alone in one fixed order, so the result is the one-thread result, bit for bit."""
    q, k, v, mask = inputs(1, 9, 3, 129, 64, seed=5)
    torch.set_num_threads(1)
    alone = kernel.decode_attention(q, k, v, mask, 0.125)
    torch.set_num_threads(n_threads)
    assert torch.equal(kernel.decode_attention(q, k, v, mask, 0.125), alone)
    torch.testing.assert_close(alone, reference(q, k, v, mask, 0.125), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 7, 8, 9, 33])  # tails of every size for the vector exp (8 or 16 lanes)
def test_peaked_scores_and_large_negative_masks_match_sdpa(kernel, length):
    """The kernel's exp is its own vector polynomial: scores spread over hundreds (peaked softmax) and float masks
    around where expf leaves the normal floats (-87.3) still give SDPA's result."""
    q, k, v, _ = inputs(3, 4, 2, length, 16, seed=length)
    q = q * 40
    mask = torch.linspace(-100.0, 0.0, length).expand(3, 1, 1, length).contiguous()
    mask[1, ..., ::2] = -87.5
    for m in (None, mask):
        torch.testing.assert_close(kernel.decode_attention(q, k, v, m, 0.25), reference(q, k, v, m, 0.25),
                                   atol=2e-6, rtol=1e-5)


def test_a_row_with_every_position_left_out_gets_zeros(kernel):
    q, k, v, _ = inputs(2, 4, 2, 6, 16, seed=3)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1] = False
    out = kernel.decode_attention(q, k, v, mask, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], reference(q[:1], k[:1], v[:1], mask[:1], 0.25))


def test_bad_shapes_are_refused(kernel):
    q, k, v, _ = inputs(2, 4, 2, 6, 16, seed=3)
    with pytest.raises(RuntimeError, match="shapes"):
        kernel.decode_attention(q, k[:, :, :5], v, None, 1.0)
    with pytest.raises(RuntimeError, match="mask"):
        kernel.decode_attention(q, k, v, torch.ones(2, 4, 1, 6, dtype=torch.bool), 1.0)


def test_everything_else_goes_to_transformers_sdpa(kernel, monkeypatch):
    """Prefill (T > 1), grad, per-head masks and soft-capping take transformers' own function, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_llama(seed=2)
    assert dense_kernel.install(model) > 0
    attn = model.model.layers[0].self_attn
    calls = []
    monkeypatch.setattr(decode_attention, "_sdpa", lambda *a, **kw: calls.append(a[1].shape) or sdpa_attention_forward(*a, **kw))
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    prefill = torch.randn(2, 4, 3, 8, generator=g)
    out, _ = decode_attention.attention_forward(attn, prefill, k, v, None, scaling=0.3)
    torch.testing.assert_close(out, sdpa_attention_forward(attn, prefill, k, v, None, scaling=0.3)[0], atol=0, rtol=0)
    one = torch.randn(2, 4, 1, 8, generator=g)
    decode_attention.attention_forward(attn, one, k, v, torch.ones(2, 4, 1, 5, dtype=torch.bool), scaling=0.3)
    decode_attention.attention_forward(attn, one.requires_grad_(), k, v, None, scaling=0.3)
    with pytest.raises(ValueError, match="softcap"):  # sdpa's own refusal, not a silent kernel result
        decode_attention.attention_forward(attn, one.detach(), k, v, None, scaling=0.3, softcap=30.0)
    assert calls == [prefill.shape, one.shape, one.shape, one.shape]
    calls.clear()
    with torch.no_grad():
        out, _ = decode_attention.attention_forward(attn, one.detach(), k, v, None, scaling=0.3)
    assert calls == []  # the kernel
    torch.testing.assert_close(out, sdpa_attention_forward(attn, one.detach(), k, v, None, scaling=0.3)[0], atol=2e-6, rtol=1e-5)
    dense_kernel.uninstall(model)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_left_padded_decode_steps_match_plain_transformers(kernel, threads, n_threads):
    """A batch of rows of different lengths (left padding, as the engine keeps them), several decode steps."""
    from loramux import MultiLoraModel

    torch.set_num_threads(n_threads)
    plain = tiny_llama(seed=5, hidden_size=72, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2)
    assert plain.config._attn_implementation == "sdpa"
    lm = MultiLoraModel(copy.deepcopy(plain))
    assert lm.base_model.config._attn_implementation == decode_attention.ATTN_NAME
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 96, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    with torch.inference_mode():
        caches = [m(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values for m in (plain, lm)]
        for _ in range(3):
            nxt = torch.randint(3, 96, (3, 1), generator=g)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            pos = (mask.sum(1, keepdim=True) - 1)
            want = plain(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=caches[0], use_cache=True).logits
            got = lm(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=caches[1], use_cache=True).logits
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_uninstall_points_the_config_back_at_sdpa(kernel):
    model = tiny_llama(seed=1)
    dense_kernel.install(model)
    assert model.config._attn_implementation == decode_attention.ATTN_NAME
    assert "_attn_implementation" not in model.config.to_dict() and decode_attention.ATTN_NAME not in model.config.to_json_string()
    dense_kernel.uninstall(model)
    assert model.config._attn_implementation == "sdpa"


def test_eager_models_are_left_alone(kernel):
    model = tiny_llama(seed=1, attn_implementation="eager")
    dense_kernel.install(model)
    assert model.config._attn_implementation == "eager"
    dense_kernel.uninstall(model)


def test_a_model_that_tests_the_attention_name_itself_keeps_sdpa():
    """Falcon's modeling code branches on ``_attn_implementation == "sdpa"``: under another name it took
    its eager path, which relies on SDPA's is_causal (no causal mask), and gave wrong logits (0.12 off on
    a tiny Falcon). Such models keep SDPA, and their logits stay transformers' own."""
    import copy

    from transformers import FalconConfig, FalconForCausalLM

    from loramux import MultiLoraModel

    torch.manual_seed(0)
    base = FalconForCausalLM(FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          attn_implementation="sdpa")).eval()
    ids = torch.randint(3, 90, (3, 7))
    ours = MultiLoraModel(copy.deepcopy(base))
    assert ours.base_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)
