"""The lean decode-step forward of Llama-code decoder layers (``decode_layers.py``): bit-equal to transformers'
forward over the same modules (adapters, mixed rows, left padding, 1 and 2 threads; the two-call block path
for batches with no adapter in a layer, fp32 and int8), rotary bit-equal to transformers', every other call on
transformers' forward, other architectures left alone."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from loramux import MultiLoraModel, decode_layers, dense_kernel

from lora_fixtures import make_adapter, tiny_llama


@pytest.fixture
def kernel(decode_gemm_kernel):  # tests/conftest.py: built once, fails (not skips) where it should build
    return decode_gemm_kernel


def lean_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.startswith("Lean")]


class switched_off:
    """The same model with its layers on transformers' own forward for the duration (the reference)."""

    def __init__(self, model) -> None:
        self.layers = lean_layers(model)

    def __enter__(self):
        for layer in self.layers:
            layer.__class__ = type(layer).__mro__[1]

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__class__ = decode_layers._lean_class(type(layer))


@pytest.mark.parametrize("b,hq,hkv,d,shared", [(1, 9, 3, 64, False), (3, 4, 2, 8, False), (5, 2, 1, 6, True), (2, 3, 3, 2, True)])
def test_rotary_is_bit_equal_to_transformers(kernel, b, hq, hkv, d, shared):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(b * 10 + d)
    q, k = torch.randn(b, 1, hq, d, generator=g), torch.randn(b, 1, hkv, d, generator=g)
    angles = torch.rand(1 if shared else b, 1, d, generator=g) * 50
    cos, sin = angles.cos(), angles.sin()
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, H, 1, D) layout
    got_q, got_k = kernel.decode_rotary(q, k, cos, sin)
    assert torch.equal(got_q.transpose(1, 2), want_q) and torch.equal(got_k.transpose(1, 2), want_k)


def test_rotary_refuses_bad_shapes(kernel):
    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8)
    with pytest.raises(RuntimeError, match="cos/sin"):
        kernel.decode_rotary(q, k, torch.randn(3, 1, 8), torch.randn(3, 1, 8))
    with pytest.raises(RuntimeError, match="even D"):
        kernel.decode_rotary(torch.randn(2, 1, 4, 7), torch.randn(2, 1, 2, 7), torch.randn(2, 1, 7), torch.randn(2, 1, 7))


@pytest.fixture
def lm_with_adapters(kernel, tmp_path):
    base = tiny_llama(seed=3, hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2)
    all_linear = make_adapter(base, tmp_path / "all", seed=4, r=4, lora_alpha=8,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    qv = make_adapter(base, tmp_path / "qv", seed=5, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    dora = make_adapter(base, tmp_path / "dora", seed=6, r=4, lora_alpha=8, use_dora=True,
                        target_modules=["k_proj", "up_proj"])  # not the grouped kernel's: module calls in its layers
    lm = MultiLoraModel(copy.deepcopy(base))
    lm.load_adapter(all_linear, adapter_name="all")
    lm.load_adapter(qv, adapter_name="qv")
    lm.load_adapter(dora, adapter_name="dora")
    assert len(lean_layers(lm)) == 2
    return base, lm


class Spy:
    """The kernel module, recording which of its lean-path calls ran."""

    def __init__(self, kernel, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    def __getattr__(self, name: str):
        def call(*args):
            self.calls.append(name)
            return getattr(self.kernel, name)(*args)
        return call


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("second", ["qv", "dora"])
def test_decode_steps_are_bit_equal_to_transformers_forward_over_the_same_modules(lm_with_adapters, threads, n_threads,
                                                                                  second):
    """Left-padded rows over two adapters and the base, several steps: the lean forward gives exactly what the
    same model gives with its layers on transformers' forward (same kernels, same adapters), and what the plain
    transformers model gives for the base row within fp32 tolerance. Plain LoRA rows: each layer two block calls
    (the grouped-LoRA kernel called inside them); a DoRA row: the module calls, q/k/v and gate/up grouped."""
    base, lm = lm_with_adapters
    torch.set_num_threads(n_threads)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 96, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    names = ["all", "__base__", second]
    calls = []
    real = decode_layers._KERNEL
    with torch.inference_mode():
        def prefill(model, **kw):
            return model(input_ids=ids, attention_mask=mask, use_cache=True, **kw).past_key_values
        with switched_off(lm):
            ref_cache = prefill(lm, adapter_names=names)
        lean_cache, plain_cache = prefill(lm, adapter_names=names), prefill(base)
        for _ in range(4):
            nxt = torch.randint(3, 96, (3, 1), generator=g)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            step = dict(input_ids=nxt, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1, use_cache=True)
            with switched_off(lm):
                want = lm(past_key_values=ref_cache, adapter_names=names, **step).logits
            decode_layers._KERNEL = Spy(real, calls)
            try:
                got = lm(past_key_values=lean_cache, adapter_names=names, **step).logits
            finally:
                decode_layers._KERNEL = real
            assert torch.equal(got, want)
            torch.testing.assert_close(got[1], base(past_key_values=plain_cache, **step).logits[1], atol=2e-5, rtol=1e-4)
    if second == "qv":  # every step, both layers: the two block calls
        assert calls == ["decode_block_qkv", "decode_block_mlp"] * 4 * 2
    else:  # rotary once, q/k/v and gate/up in one call each
        assert calls == ["decode_linear_group", "decode_rotary", "decode_linear_group"] * 4 * 2
    assert not torch.allclose(got[0], got[1])  # the adapters change the rows (else equality proves little)


def decode_steps(lm, names, spy_calls: list, steps: int = 3, seed: int = 11):
    """Prefill 2-3 left-padded rows, then ``steps`` decode steps on the lean forward (kernel calls recorded in
    ``spy_calls``) and on transformers' forward over the same modules; returns both logits per step."""
    rows = len(names)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, 7), generator=g)
    mask = torch.ones(rows, 7, dtype=torch.long)
    mask[-1, :4] = 0
    real, out = decode_layers._KERNEL, []
    with torch.inference_mode():
        with switched_off(lm):
            ref_cache = lm(input_ids=ids, attention_mask=mask, use_cache=True, adapter_names=names).past_key_values
        lean_cache = lm(input_ids=ids, attention_mask=mask, use_cache=True, adapter_names=names).past_key_values
        for _ in range(steps):
            nxt = torch.randint(3, 96, (rows, 1), generator=g)
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
            step = dict(input_ids=nxt, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1, use_cache=True,
                        adapter_names=names)
            with switched_off(lm):
                want = lm(past_key_values=ref_cache, **step).logits
            decode_layers._KERNEL = Spy(real, spy_calls)
            try:
                got = lm(past_key_values=lean_cache, **step).logits
            finally:
                decode_layers._KERNEL = real
            out.append((got, want))
    return out


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("names", [("__base__", None), ("all", "__base__"), None])
def test_block_calls_over_fp32_and_int8_bases(kernel, tmp_path, threads, n_threads, int8, names):
    """Base rows (no adapter loaded: names None; or loaded beside them) and a row over a plain all-linear LoRA,
    fp32 and int8 bases: each layer is one ``decode_block_qkv`` and one ``decode_block_mlp`` call, and the
    logits are those of transformers' forward over the same modules, bit for bit."""
    from loramux.quantize import quantize_model

    torch.set_num_threads(n_threads)
    base = tiny_llama(seed=6, hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2)
    adapter = make_adapter(base, tmp_path / "all", seed=7, r=4, lora_alpha=8,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if int8:
        quantize_model(base)
    lm = MultiLoraModel(base)
    if names is not None:
        lm.load_adapter(adapter, adapter_name="all")
    calls = []
    for got, want in decode_steps(lm, list(names or ("__base__", None)), calls):
        assert torch.equal(got, want)
    assert calls == ["decode_block_qkv", "decode_block_mlp"] * 3 * 2
    if names and names[0] == "all":  # the adapter changed its row (same prompts and tokens, both rows base)
        base_got, _ = decode_steps(lm, ["__base__", "__base__"], [])[-1]
        assert not torch.allclose(got[0], base_got[0], atol=1e-3) and torch.equal(got[1], base_got[1])


def test_an_adapter_row_or_a_hook_keeps_the_module_calls(lm_with_adapters):
    """A row whose adapter the grouped kernel does not take (DoRA) in a layer's projections, or a hook on a norm,
    the activation or a base linear inside a LoRA wrapper: that layer runs its modules one by one (and the hook
    runs), same logits."""
    _, lm = lm_with_adapters
    calls = []
    for got, want in decode_steps(lm, ["__base__", "dora"], calls):  # dora: k_proj and up_proj of every layer
        assert torch.equal(got, want)
    assert "decode_block_qkv" not in calls and calls.count("decode_rotary") == 3 * 2
    layer = lm.base_model.model.layers[1]
    for module in (layer.input_layernorm, layer.mlp.act_fn, layer.self_attn.o_proj.base_layer):
        hooked, calls = [], []
        handle = module.register_forward_hook(lambda *a: hooked.append(1))
        try:
            for got, want in decode_steps(lm, ["__base__", None], calls, steps=2):
                assert torch.equal(got, want)
        finally:
            handle.remove()
        assert calls.count("decode_block_qkv") == 2 and calls.count("decode_rotary") == 2  # layer 0 fused, layer 1 not
        assert len(hooked) == 2 + 2 * 2  # both prefills and both forwards of each step (lean and reference)


def test_every_other_call_runs_transformers_forward(lm_with_adapters, monkeypatch):
    """Prefill, autograd, output_attentions and a hook on the attention module take transformers' forward."""
    _, lm = lm_with_adapters
    layer_cls = type(lean_layers(lm)[0])
    original, seen = layer_cls._transformers_forward, []
    monkeypatch.setattr(layer_cls, "_transformers_forward", lambda self, *a, **kw: seen.append(a[0].shape) or original(self, *a, **kw))
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = lm(input_ids=ids, use_cache=True).past_key_values            # prefill: T = 5
    assert seen == [(2, 5, 48)] * 2
    seen.clear()
    nxt = ids[:, :1]
    with torch.no_grad():
        lm(input_ids=nxt, past_key_values=copy.deepcopy(cache), use_cache=True)  # decode: lean
        assert seen == []
        lm(input_ids=nxt, past_key_values=copy.deepcopy(cache), use_cache=True, output_attentions=True)
        assert len(seen) == 2  # (SDPA returns no weights: transformers' own answer to that, not ours)
        seen.clear()
        hooked = []
        handle = lm.base_model.model.layers[0].self_attn.register_forward_hook(lambda *a: hooked.append(1))
        lm(input_ids=nxt, past_key_values=copy.deepcopy(cache), use_cache=True)
        handle.remove()
        assert hooked == [1] and len(seen) == 2  # a hook anywhere on the attention/MLP: no lean path anywhere
    seen.clear()
    lm(input_ids=nxt, past_key_values=copy.deepcopy(cache), use_cache=True)  # grad enabled
    assert len(seen) == 2


@pytest.mark.parametrize("arch,extra", [
    ("mistral", dict(sliding_window=4)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),  # q/k/v with biases
])
def test_mistral_and_qwen2_layers_run_lean_and_keep_their_sliding_window(kernel, tmp_path, arch, extra):
    """Their attention differs from Llama's only by the ``sliding_window=`` it passes to the attention function
    (the mask carries the window): lean, bit-equal to their own forward over the same modules, and within fp32
    of plain transformers (SDPA) for the base row, past the window, with an adapter row and base-only steps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(12)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        arch, vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, **extra), attn_implementation="sdpa").eval()
    adapter = make_adapter(base, tmp_path / "qv", seed=13, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lm = MultiLoraModel(copy.deepcopy(base))
    lm.load_adapter(adapter, adapter_name="qv")
    assert [type(m).__name__ for m in lean_layers(lm)] == [f"Lean{type(base.model.layers[0]).__name__}"] * 2
    for names in (["__base__", "qv"], ["__base__", None]):
        calls = []
        steps = decode_steps(lm, names, calls, steps=4)  # 7 prompt tokens + 4 steps: past the window of 4
        for got, want in steps:
            assert torch.equal(got, want)
        assert calls == ["decode_block_qkv", "decode_block_mlp"] * 4 * 2
    g = torch.Generator().manual_seed(11)  # decode_steps' draws, again: the base row against plain transformers
    ids = torch.randint(3, 96, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[-1, :4] = 0
    with torch.inference_mode():
        cache = base(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        for got, _ in steps:
            nxt = torch.randint(3, 96, (2, 1), generator=g)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            want = base(input_ids=nxt, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                        past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_only_llama_code_gets_the_lean_forward_and_uninstall_restores(kernel):
    from transformers import AutoConfig, AutoModelForCausalLM

    qwen3 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen3", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8)).eval()  # q_norm / k_norm: not Llama's attention code
    dense_kernel.install(qwen3)
    assert lean_layers(qwen3) == []
    llama = tiny_llama(seed=1)
    dense_kernel.install(llama)
    assert [type(m).__name__ for m in lean_layers(llama)] == ["LeanLlamaDecoderLayer"] * 2
    clone = pickle.loads(pickle.dumps(llama))  # the subclass is found by name
    assert [type(m).__name__ for m in lean_layers(clone)] == ["LeanLlamaDecoderLayer"] * 2
    dense_kernel.uninstall(llama)
    assert lean_layers(llama) == [] and type(llama.model.layers[0]).__name__ == "LlamaDecoderLayer"
