"""A lean forward for Llama-style decoder layers in decode steps: the same modules, fewer ops around them.

Why: once the matmuls stream (``dense_kernel``), what is left of a B1 decode step of the default model
is dispatch: transformers' decoder layer spends ~60 ATen ops and ~15 module calls per layer around its 7
linears (rotary alone is ~15 ops: slices, neg, cat, mul, add for q and k), ~10 ms of a ~40 ms step on 2
threads, and none of it is spread over the threads. This forward calls the same submodules (so LoRA
wrappers, int8 layers, fused norms and forward hooks on the linears all still apply) and does the glue in
one kernel call (``decode_rotary``) and a handful of views; the q/k/v and gate/up base matmuls take one kernel
call each (``_projections``). Where every projection of a layer is a base linear (fp32 or int8) whose LoRA
wrapper adds nothing or plain LoRA for the batch (``LoraLayer.decode_delta``: one grouped-LoRA kernel call),
with no hooks, the layer is two kernel calls around its KV cache write and attention (``decode_block_qkv``:
norm, q/k/v, their adapters, rotary; ``decode_block_mlp``: o_proj, residual, norm, MLP, residual, each
projection's adapters): C++ calls the same kernels and ATen ops, and the grouped-LoRA extension's own
``grouped_lora_add`` code by address (its raw-rows entry), so the bits are those of the module calls. Measured on
the default model (one process, alternating, 1 thread): B1 base 50.0 vs 54.6 ms, int8 29.9 vs 32.2; B1 over a rank-8 all-linear
adapter 59.6 vs 70.5 ms; B16 over 4 adapters 150.3 vs 156.8. DoRA, LoRA biases, ``modules_to_save`` copies
and hooks keep the module calls.

Which layers: a decoder layer whose class's ``forward``, whose attention's ``forward`` (and that module's
``apply_rotary_pos_emb`` / ``rotate_half``) and whose MLP's ``forward`` are, to the character,
transformers' Llama code (SmolLM, ... keep copies of it), with both norms fused (``dense_kernel``); the
attention may also be Mistral's or Qwen2's, whose only difference is the ``sliding_window=`` they pass to the
attention function: SDPA ignores it (the mask carries the window) and so does the decode attention, which
gets SDPA's mask. Anything else keeps its class: silent wrong output is worse than a slow step.

When: a call with one token per row, float32 on CPU, no autograd, not training, the model's attention
pointed at the decode-attention kernel (``decode_attention.ATTN_NAME``), a KV cache, no
``output_attentions``, and no hooks on the attention or MLP modules (transformers records attentions
with such hooks) or global module hooks. Every other call (prefill included) runs transformers' own
forward, unchanged.

Semantics: transformers' ``LlamaDecoderLayer.forward`` for those calls; rotary is bit-equal to its
``apply_rotary_pos_emb``, attention is the decode-attention kernel's (what the original forward calls
under ``ATTN_NAME``), and the residual adds and MLP are the same ATen ops.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
from types import ModuleType

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from loramux import cpu_kernel, decode_attention
from loramux.layers import LoraLayer

logger = logging.getLogger(__name__)

_KERNEL: ModuleType | None = None  # set by install() before any lean layer exists
_DECODE_LINEAR: type | None = None  # dense_kernel.DecodeLinear and its MAX_ROWS, from install()
_MAX_ROWS = 0
_FUSED_NORMS: tuple[type, ...] = ()  # dense_kernel's fused RMSNorm classes, from install()
_INT8_LINEAR: type | None = None  # quantize.Int8Linear, from install()
_SILU: tuple[type, ...] = (nn.SiLU,)  # and transformers' SiLUActivation, from install()
_lean: dict[type, type] = {}  # decoder layer class -> its lean subclass
_ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # in the order the block calls take them
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _decode_shaped(layer: nn.Module, hidden_states: torch.Tensor, position_embeddings, past_key_values,
                   kwargs: dict) -> bool:
    return (_decode_input(hidden_states, position_embeddings, past_key_values, kwargs)
            and _layer_decodes(layer, layer._modules["self_attn"], layer._modules["mlp"]))


def _decode_input(hidden_states: torch.Tensor, position_embeddings, past_key_values, kwargs: dict) -> bool:
    """What a decode step's layer call must be given (one float32 CPU token per row, no autograd, no global
    hooks); the same for every layer of a step, so ``decode_stack`` checks it once."""
    return (hidden_states.dim() == 3 and hidden_states.shape[1] == 1 and hidden_states.dtype == torch.float32
            and hidden_states.device.type == "cpu" and not torch.is_grad_enabled()
            and position_embeddings is not None and past_key_values is not None and not kwargs.get("output_attentions")
            and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks))


def _layer_decodes(layer: nn.Module, attn: nn.Module, mlp: nn.Module, checked_config=None) -> bool:
    """What a layer must be for the decode path: in eval mode, its attention on ``ATTN_NAME``, no hooks on
    attention or MLP. ``checked_config``: a config already known to select ``ATTN_NAME`` this step (reading
    ``_attn_implementation`` goes through transformers' config ``__getattribute__``: microseconds a layer)."""
    config = attn.config
    return (not layer.training
            and (config is checked_config or config._attn_implementation == decode_attention.ATTN_NAME)
            and not (attn._forward_hooks or attn._forward_pre_hooks or mlp._forward_hooks or mlp._forward_pre_hooks))


def _lean_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.LongTensor | None = None, past_key_values=None, use_cache: bool | None = False,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    if not _decode_shaped(self, hidden_states, position_embeddings, past_key_values, kwargs):
        return self._transformers_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                          past_key_values=past_key_values, use_cache=use_cache,
                                          position_embeddings=position_embeddings, **kwargs)
    attn, mlp = self.self_attn, self.mlp
    rows = hidden_states.shape[0]
    plan = _block_plan(self, attn, mlp, hidden_states.device, rows)
    if plan is not None:  # every projection a base linear plus plain LoRA at most: two kernel calls around attention
        norm1, qkv, norm2, rest = plan
        q, k, v = _KERNEL.decode_block_qkv(hidden_states, *norm1, *qkv, *position_embeddings, attn.head_dim, _MAX_ROWS)
        keys, values = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx)  # (B, Hkv, L, D)
        out, _ = decode_attention.attention_forward(attn, q.transpose(1, 2), keys, values, attention_mask,
                                                    scaling=attn.scaling, **kwargs)  # (B, 1, Hq, D)
        return _KERNEL.decode_block_mlp(hidden_states, out, *rest, *norm2, _MAX_ROWS)
    residual = hidden_states                                              # (B, 1, d)
    h = self.input_layernorm(hidden_states)
    q, k, v = _projections(h, (attn.q_proj, attn.k_proj, attn.v_proj))   # (B, 1, Hq * D), (B, 1, Hkv * D) x 2
    q = q.view(rows, 1, -1, attn.head_dim)                                # (B, 1, Hq, D)
    k = k.view(rows, 1, -1, attn.head_dim)                                # (B, 1, Hkv, D)
    v = v.view(rows, 1, -1, attn.head_dim)
    cos, sin = position_embeddings                                        # (1 or B, 1, D)
    q, k = _KERNEL.decode_rotary(q, k, cos, sin)
    keys, values = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx)  # (B, Hkv, L, D)
    out, _ = decode_attention.attention_forward(attn, q.transpose(1, 2), keys, values, attention_mask,
                                                scaling=attn.scaling, **kwargs)  # (B, 1, Hq, D)
    hidden_states = residual + attn.o_proj(out.reshape(rows, 1, -1))
    residual = hidden_states
    h = self.post_attention_layernorm(hidden_states)
    gate, up = _projections(h, (mlp.gate_proj, mlp.up_proj))
    return residual + mlp.down_proj(mlp.act_fn(gate) * up)


def _block_plan(layer: nn.Module, attn: nn.Module, mlp: nn.Module, device: torch.device, rows: int,
                lora_free: bool = False):
    """The kernel arguments of ``decode_block_qkv`` / ``decode_block_mlp`` for this call, or None where the
    module calls must run: the norms are fused norms, the activation SiLU, and each projection a ``DecodeLinear``
    or an int8 base linear, bare or in a ``LoraLayer`` whose adapters for this batch are nothing or one
    grouped-LoRA kernel call (``LoraLayer.decode_delta``: plain LoRA groups), with no hooks on any of them.
    Reads the modules' own tables (``_modules``, ``_parameters``, ``_buffers``): it runs for every layer of
    every step, and ``nn.Module.__getattr__`` is a Python call each. ``lora_free``: ``layers.lora_free_forward``
    was found true for this forward (``decode_stack`` asks once a step)."""
    norms = []
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = layer._modules.get(name)
        if type(norm) not in _FUSED_NORMS or _hooked(norm):
            return None
        norms.append((norm._parameters["weight"], norm.variance_epsilon))
    act = mlp._modules.get("act_fn")
    if type(act) not in _SILU or _hooked(act):
        return None
    weights, scales, biases, loras = [], [], [], []
    for owner, names in ((attn._modules, _ATTN_PROJECTIONS), (mlp._modules, _MLP_PROJECTIONS)):
        for name in names:
            module, lora = owner[name], ()
            if _hooked(module):
                return None
            if type(module) is LoraLayer:
                lora = module.decode_delta(device, rows, lora_free)
                module = module._modules["base_layer"]
                if lora is None or _hooked(module):
                    return None
            if type(module) is _DECODE_LINEAR:
                weights.append(module._parameters["weight"])
                scales.append(None)
            elif type(module) is _INT8_LINEAR:
                weights.append(module._buffers["qweight"])
                scales.append(module._buffers["wscale"])
            else:
                return None
            biases.append(module._parameters["bias"])
            loras.append(lora or None)
    lora_add = _lora_add_address() if any(loras) else 0
    return (norms[0], (weights[:3], scales[:3], biases[:3], loras[:3], lora_add), norms[1],
            (weights[3:], scales[3:], biases[3:], loras[3:], lora_add))


def _lora_add_address() -> int:
    """Where the grouped-LoRA extension's ``grouped_lora_add_raw`` (``grouped_lora_add`` on raw rows) is (loaded:
    ``decode_delta`` needed it). Asked every time, never cached: a reloaded extension moves it."""
    return cpu_kernel.load().grouped_lora_add_raw_address()


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _projections(x: torch.Tensor, modules: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """``[m(x) for m in modules]``; the base matmuls in one kernel call (``decode_linear_group``: one read of
    ``x``, the threads meet once) when each module is a ``DecodeLinear`` or a ``LoraLayer`` over one, with no
    hooks: the wrappers then add their adapters to their share (``LoraLayer.add_adapters``). Bit-equal to the
    module calls: each output element is the same accumulator chain."""
    bases = []
    for module in modules:
        base = module.base_layer if type(module) is LoraLayer else module
        if (type(base) is not _DECODE_LINEAR or module._forward_hooks or module._forward_pre_hooks
                or base._forward_hooks or base._forward_pre_hooks):
            return [m(x) for m in modules]
        bases.append(base)
    ys = _KERNEL.decode_linear_group(x, [b.weight for b in bases], [b.bias for b in bases], _MAX_ROWS)
    return [y if m is b else m.add_adapters(y, x) for m, b, y in zip(modules, bases, ys)]


def _same_source(ours, theirs) -> bool:
    try:
        return inspect.getsource(ours) == inspect.getsource(theirs)
    except (OSError, TypeError):  # no source to compare: not provably the same code
        return False


def _is_llama_code(layer: nn.Module) -> bool:
    """The layer's, its attention's and its MLP's code are transformers' Llama code (the attention's may be Mistral's
    or Qwen2's), character for character."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "config",
                                                                          "head_dim", "scaling", "layer_idx")):
        return False
    return _llama_classes(type(layer), type(attn), type(mlp))


@functools.lru_cache(maxsize=None)
def _llama_classes(layer_cls: type, attn_cls: type, mlp_cls: type) -> bool:
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    attn_module = sys.modules.get(attn_cls.__module__)
    return (_same_source(layer_cls.forward, llama.LlamaDecoderLayer.forward)
            and any(_same_source(attn_cls.forward, reference.forward)
                    for reference in (llama.LlamaAttention, mistral.MistralAttention, qwen2.Qwen2Attention))
            and _same_source(mlp_cls.forward, llama.LlamaMLP.forward)
            and attn_module is not None
            and _same_source(getattr(attn_module, "apply_rotary_pos_emb", None), llama.apply_rotary_pos_emb)
            and _same_source(getattr(attn_module, "rotate_half", None), llama.rotate_half))


def forward_subclass(cls: type, registry: dict[type, type], prefix: str, forward, module_name: str, doc: str) -> type:
    """``cls`` with ``forward`` (which may call ``self._transformers_forward``, ``cls``'s own), made once per class
    and kept in ``registry``; named ``prefix + cls.__name__`` in module ``module_name`` so that pickling finds it."""
    if cls not in registry:
        name = f"{prefix}{cls.__name__}"
        registry[cls] = type(name, (cls,), {"forward": forward, "_transformers_forward": cls.forward,
                                            "__module__": module_name, "__qualname__": name, "__doc__": doc})
        setattr(sys.modules[module_name], name, registry[cls])
    return registry[cls]


def restore_classes(model: nn.Module, registry: dict[type, type]) -> int:
    """Every module of ``model`` whose class is one of ``registry``'s subclasses back to its class; how many."""
    original = {subclass: cls for cls, subclass in registry.items()}
    count = 0
    for module in model.modules():
        if type(module) in original:
            module.__class__ = original[type(module)]
            count += 1
    return count


def _lean_class(cls: type) -> type:
    """The lean subclass of ``cls``."""
    return forward_subclass(cls, _lean, "Lean", _lean_forward, __name__, f"``{cls.__name__}`` with the lean decode-step forward.")


def install(model: nn.Module, kernel: ModuleType, fused_norms: tuple[type, ...], decode_linear: type, max_rows: int) -> int:
    """Switch every Llama-code decoder layer of ``model`` whose norms are ``fused_norms`` to its lean
    subclass; returns how many were switched (0 where transformers' Llama code is not importable).
    ``decode_linear``/``max_rows``: dense_kernel's linear class and its row limit (projections of that class
    share one kernel call)."""
    global _KERNEL, _DECODE_LINEAR, _MAX_ROWS, _FUSED_NORMS, _INT8_LINEAR, _SILU
    try:
        import transformers.models.llama.modeling_llama  # noqa: F401 - the reference code
    except ImportError:
        return 0
    layers = [m for m in model.modules() if type(m) not in _lean.values()
              and isinstance(getattr(m, "input_layernorm", None), fused_norms)
              and isinstance(getattr(m, "post_attention_layernorm", None), fused_norms) and _is_llama_code(m)]
    if layers:
        from transformers.activations import SiLUActivation

        from loramux.quantize import Int8Linear  # imports dense_kernel, which imports this module

        _KERNEL, _DECODE_LINEAR, _MAX_ROWS = kernel, decode_linear, max_rows
        _FUSED_NORMS, _INT8_LINEAR, _SILU = tuple(fused_norms), Int8Linear, (nn.SiLU, SiLUActivation)
    for layer in layers:
        layer.__class__ = _lean_class(type(layer))
    return len(layers)


def uninstall(model: nn.Module) -> int:
    """Back to transformers' classes."""
    return restore_classes(model, _lean)
