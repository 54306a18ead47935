"""A decode step through all decoder layers in one kernel call (``decode_stack.py``): bit-equal to the lean layers
called one by one (logits and the KV cache, adapters mixed with base rows, left padding, fp32 and int8, 1 and 2
threads), and every case it does not take (another cache, a hook, an adapter kind the block calls do not run, a
full cache, output capture) runs the layer calls instead, with the same results."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from loramux import MultiLoraModel, decode_stack, dense_kernel
from loramux.engine.kv import RowsKV

from lora_fixtures import make_adapter, tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def kernel(decode_gemm_kernel):  # tests/conftest.py: built once, fails (not skips) where it should build
    return decode_gemm_kernel


def stacked_model(lm):
    (inner,) = [m for m in lm.modules() if type(m) in decode_stack._lean.values()]
    return inner


class layer_calls:
    """The same model with its decoder model on transformers' forward (lean layers one call each): the reference."""

    def __init__(self, lm) -> None:
        self.inner = stacked_model(lm)
        self.cls = type(self.inner)

    def __enter__(self):
        self.inner.__class__ = self.cls.__mro__[1]

    def __exit__(self, *exc) -> None:
        self.inner.__class__ = self.cls


class CountingKernel:
    """The kernel module, counting its ``decode_stack`` calls."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, 0

    def __getattr__(self, name: str):
        if name == "decode_stack":
            self.calls += 1
        return getattr(self.kernel, name)


def make_lm(tmp_path, int8: bool = False):
    from loramux.quantize import quantize_model

    base = tiny_llama(seed=3, hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2)
    adapters = {"all": make_adapter(base, tmp_path / "all", seed=4, r=4, lora_alpha=8, target_modules=ALL_LINEAR),
                "qv": make_adapter(base, tmp_path / "qv", seed=5, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                "dora": make_adapter(base, tmp_path / "dora", seed=6, r=4, lora_alpha=8, use_dora=True,
                                     target_modules=["k_proj", "up_proj"])}
    model = copy.deepcopy(base)
    if int8:
        quantize_model(model)
    lm = MultiLoraModel(model)
    for name, path in adapters.items():
        lm.load_adapter(path, adapter_name=name)
    return lm


def run_steps(lm, names, steps: int = 4, seed: int = 9, prepare=None, pad: bool = True, **step_kwargs):
    """Prefill rows (the last one left-padded, with ``pad``) into two ``RowsKV`` caches, then ``steps`` decode steps
    through the stack and through the layer calls; returns (stack outputs, layer-call outputs, stack calls, both
    caches). ``names``: one adapter name per row, or a prepared routing (``MultiLoraModel.prepare_routing``)."""
    rows = len(getattr(names, "rows", names))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, 8), generator=g)
    mask = torch.ones(rows, 8, dtype=torch.long)
    if pad:
        mask[-1, :5] = 0
    counting = CountingKernel(decode_stack._KERNEL)
    got, want = [], []
    with torch.inference_mode():
        caches = []
        for _ in range(2):
            cache = RowsKV()
            lm(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, adapter_names=names)
            caches.append(cache)
        if prepare is not None:
            prepare(caches)
        real = decode_stack._KERNEL
        for _ in range(steps):
            nxt = torch.randint(3, 96, (rows, 1), generator=g)
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
            step = dict(input_ids=nxt, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1, use_cache=True,
                        adapter_names=names, **step_kwargs)
            decode_stack._KERNEL = counting
            try:
                got.append(lm(past_key_values=caches[0], **step))
            finally:
                decode_stack._KERNEL = real
            with layer_calls(lm):
                want.append(lm(past_key_values=caches[1], **step))
    return got, want, counting.calls, caches


def assert_same_caches(a: RowsKV, b: RowsKV) -> None:
    assert a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("int8", [False, True])
def test_decode_steps_through_the_stack_equal_the_layer_calls(kernel, tmp_path, threads, n_threads, int8):
    """Rows over two plain-LoRA adapters and the base, left-padded: one ``decode_stack`` call a step, the logits
    and every layer's keys/values bit-equal to the lean layers called one by one."""
    torch.set_num_threads(n_threads)
    lm = make_lm(tmp_path, int8)
    got, want, calls, caches = run_steps(lm, ["all", "__base__", "qv"])
    assert calls == 4
    for g, w in zip(got, want):
        assert torch.equal(g.logits, w.logits)
    assert_same_caches(*caches)
    assert caches[0].get_seq_length() == 8 + 4
    assert not torch.allclose(got[-1].logits[0], got[-1].logits[1], atol=1e-3)  # the adapters change their rows


@pytest.mark.parametrize("pad", [False, True])
def test_a_mask_with_no_padding_skips_create_causal_mask(kernel, tmp_path, monkeypatch, pad):
    """Rows without padding: transformers' mask for them is no mask, and the stack does not build it each step (it
    still does where a row is padded); the steps equal the layer calls (which build it) bit for bit either way."""
    from transformers import masking_utils
    from transformers.models.llama import modeling_llama

    lm = make_lm(tmp_path)
    built = {"stack": [], "transformers": []}
    real = masking_utils.create_causal_mask

    def recording(into):
        return lambda **kw: built[into].append(real(**kw)) or built[into][-1]

    monkeypatch.setattr(masking_utils, "create_causal_mask", recording("stack"))  # decode_stack imports it from here
    monkeypatch.setattr(modeling_llama, "create_causal_mask", recording("transformers"))
    got, want, calls, caches = run_steps(lm, ["all", "__base__", "qv"], steps=3, pad=pad)
    assert calls == 3 and all(torch.equal(g.logits, w.logits) for g, w in zip(got, want))
    assert_same_caches(*caches)
    assert len(built["stack"]) == (3 if pad else 0)
    decode_masks = built["transformers"][2:]  # after the two prefills: the layer calls' 3 decode steps
    assert len(decode_masks) == 3 and all(m is None for m in decode_masks) != pad  # unpadded: transformers' is none


def test_a_prepared_routing_plans_each_wrapper_once_over_the_steps(kernel, tmp_path, monkeypatch):
    """The engine's decode batch routes by one prepared routing over many steps: each wrapper's answer for it
    (``LoraLayer.decode_delta``: which grouped-LoRA call adds its adapters) is worked out once and kept on the
    routing's mapping, and the steps still equal the layer calls bit for bit."""
    from loramux import layers

    lm = make_lm(tmp_path)
    asked = []
    real = layers.kernel_call
    monkeypatch.setattr(layers, "kernel_call", lambda table, *args: asked.append(table) or real(table, *args))
    routing = lm.prepare_routing(["all", None, "qv"])
    got, want, calls, caches = run_steps(lm, routing, steps=3)
    assert calls == 3 and all(torch.equal(g.logits, w.logits) for g, w in zip(got, want))
    assert_same_caches(*caches)
    wrapped = [m for m in lm.modules() if type(m) is layers.LoraLayer]
    assert len(asked) == len(wrapped) and len({id(t) for t in asked}) == len(wrapped)  # once each, not once a step


def test_base_rows_beside_loaded_adapters_take_the_stack(kernel, tmp_path):
    """Every row on the base while adapters (a DoRA one included) are loaded: each wrapper adds nothing, known once
    a step (``layers.lora_free_forward``); the stack runs and equals the layer calls."""
    lm = make_lm(tmp_path)
    got, want, calls, caches = run_steps(lm, ["__base__", "__base__"], steps=3)
    assert calls == 3 and all(torch.equal(g.logits, w.logits) for g, w in zip(got, want))
    assert_same_caches(*caches)


def test_where_the_stack_cannot_run_the_layers_are_called(kernel, tmp_path):
    """A DoRA row (no block calls), a hook on a decoder layer (it runs), output_hidden_states (transformers records
    them through hooks): the layer calls run, same results; a transformers cache is left to them too."""
    lm = make_lm(tmp_path)
    got, want, calls, caches = run_steps(lm, ["__base__", "dora"], steps=2)
    assert calls == 0 and all(torch.equal(g.logits, w.logits) for g, w in zip(got, want))
    assert_same_caches(*caches)

    hooked = []
    handle = stacked_model(lm).layers[1].register_forward_hook(lambda *a: hooked.append(1))
    try:
        got, want, calls, _ = run_steps(lm, ["all", "__base__"], steps=2)
    finally:
        handle.remove()
    assert calls == 0 and all(torch.equal(g.logits, w.logits) for g, w in zip(got, want))
    assert len(hooked) == 2 + 2 * 2  # both prefills, then each step's two forwards

    got, want, calls, _ = run_steps(lm, ["all", "__base__"], steps=2, output_hidden_states=True)
    assert calls == 0
    for g, w in zip(got, want):
        assert len(g.hidden_states) == 3 and all(torch.equal(a, b) for a, b in zip(g.hidden_states, w.hidden_states))

    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    counting, real = CountingKernel(decode_stack._KERNEL), decode_stack._KERNEL
    with torch.inference_mode():
        cache = lm(input_ids=ids, use_cache=True).past_key_values  # transformers' DynamicCache
        decode_stack._KERNEL = counting
        try:
            lm(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
        finally:
            decode_stack._KERNEL = real
    assert counting.calls == 0


@pytest.mark.parametrize("change", ["hook on self_attn", "pre-hook on mlp", "layer in training mode",
                                    "its attention on sdpa"])
def test_one_layer_the_decode_path_cannot_take_sends_the_step_to_the_layer_calls(kernel, tmp_path, change):
    """The stack checks the step's input once and each layer's own conditions per layer: one layer off the decode
    path (a hook on its attention or MLP, training mode, another attention implementation through a config of its
    own) and the step runs the layer calls, same results."""
    lm = make_lm(tmp_path)
    layer = stacked_model(lm).layers[1]
    seen, undo = [], lambda: None
    if change == "hook on self_attn":
        undo = layer.self_attn.register_forward_hook(lambda *a: seen.append(1)).remove
    elif change == "pre-hook on mlp":
        undo = layer.mlp.register_forward_pre_hook(lambda *a: seen.append(1)).remove
    elif change == "layer in training mode":
        layer.train()
        undo = layer.eval
    else:
        own = copy.copy(layer.self_attn.config)
        own._attn_implementation = "sdpa"
        shared, layer.self_attn.config = layer.self_attn.config, own
        undo = lambda: setattr(layer.self_attn, "config", shared)  # noqa: E731
    try:
        got, want, calls, caches = run_steps(lm, ["all", "__base__"], steps=2)
    finally:
        undo()
    assert calls == 0 and all(torch.equal(g.logits, w.logits) for g, w in zip(got, want))
    assert_same_caches(*caches)
    if change.startswith(("hook", "pre-hook")):
        assert len(seen) == 2 + 2 * 2  # both prefills, then each step's two forwards
    got, want, calls, _ = run_steps(lm, ["all", "__base__"], steps=2)
    assert calls == 2  # undone: the stack again


def test_a_full_cache_grows_through_the_layer_calls_then_the_stack_goes_on(kernel, tmp_path):
    """No room for the next column: that step runs the layer calls (RowsKV grows its buffers), the next ones the
    stack again; same logits and caches throughout."""
    lm = make_lm(tmp_path)

    def fill(caches):  # buffers exactly as wide as the live window: the next column does not fit
        for cache in caches:
            for layer in cache.layers:
                layer.resize(layer.buf_k.shape[0], layer.end - layer.start, 0)

    got, want, calls, caches = run_steps(lm, ["all", "__base__"], steps=3, prepare=fill)
    assert calls == 2
    assert all(torch.equal(g.logits, w.logits) for g, w in zip(got, want))
    assert_same_caches(*caches)


def test_installed_on_llama_code_models_and_undone_by_uninstall(kernel, tmp_path):
    lm = make_lm(tmp_path)
    inner = stacked_model(lm)
    assert type(inner).__name__ == "StackedLlamaModel" and type(inner).__mro__[1].__name__ == "LlamaModel"
    assert type(pickle.loads(pickle.dumps(inner))) is type(inner)  # registered by name
    assert dense_kernel.uninstall(lm.base_model) > 0
    assert type(inner).__name__ == "LlamaModel"
