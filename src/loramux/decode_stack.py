"""A decode step of a Llama-code model in one kernel call for all its decoder layers (``decode_stack``).

Why: with the matmuls streaming (``dense_kernel``) and each layer two block calls (``decode_layers``), what is left
between the kernels of a decode step is Python: transformers' layer loop, the lean forward's checks and plan,
the KV cache write and the attention call, ~170 us a layer measured inside a B1 step of the default model (~5 ms
of ~46 on 1 thread; the interpreter's code and objects are cold in cache after each layer's weights stream
through, so it costs ~2x what the same calls cost in a loop). Here the model's forward works out every layer's
block plan first and hands the whole stack to ``decode_stack`` in ``csrc/decode_gemm.cpp``, which runs, per
layer, the same block calls, the KV column write that ``RowsKV`` would do, and the same attention kernel: the
bits are the lean layers' (test).

When: the model (``LlamaModel``, or a class whose ``forward`` is its code, character for character) is called
with ``input_ids`` of one token per row, a ``RowsKV`` cache with room for the column in every layer (the engine's
decode steps), ``use_cache``, no autograd, not training, no output capture (``output_hidden_states`` /
``output_attentions``, which transformers records through hooks: any hook on a layer keeps the layer calls),
``return_dict`` not False, no other keyword arguments, every layer a lean layer whose block plan exists for this
batch (``decode_layers._block_plan``), a fused final norm and a mask the attention kernel takes. Anything else
runs transformers' forward, unchanged (and so the lean layers, one call each).
"""
from __future__ import annotations

import functools
import inspect
import logging
from types import ModuleType

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from loramux import decode_attention, decode_layers
from loramux.layers import lora_free_forward

logger = logging.getLogger(__name__)

_KERNEL: ModuleType | None = None  # set by install()
_lean: dict[type, type] = {}  # decoder model class -> its stack subclass
_PASSED = frozenset({"input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache"})


def _stack_forward(self, *args, **kwargs):
    out = None if args else _run_stack(self, kwargs)
    return out if out is not None else self._transformers_forward(*args, **kwargs)


def _run_stack(self, kwargs: dict):
    """The model's output through ``decode_stack``, or None where transformers' forward must run (nothing changed)."""
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from loramux.engine.kv import RowsKV

    input_ids, cache = kwargs.get("input_ids"), kwargs.get("past_key_values")
    config = self.config
    if (not _PASSED.issuperset(kwargs) or kwargs.get("inputs_embeds") is not None or type(cache) is not RowsKV
            or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1
            or not (kwargs.get("use_cache") if kwargs.get("use_cache") is not None else config.use_cache)
            or torch.is_grad_enabled() or self.training or getattr(config, "output_hidden_states", False)
            or getattr(config, "output_attentions", False) or getattr(config, "return_dict", True) is False
            or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks):
        return None
    layers = list(self.layers)[: config.num_hidden_layers]
    lean_classes = tuple(decode_layers._lean.values())
    if (not layers or any(type(layer) not in lean_classes or decode_layers._hooked(layer) for layer in layers)
            or type(self.norm) not in decode_layers._FUSED_NORMS or decode_layers._hooked(self.norm)):
        return None
    rows = input_ids.shape[0]
    columns = cache.decode_columns(rows)
    if columns is None:
        return None
    hidden = self.embed_tokens(input_ids)                                       # (B, 1, d)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # as transformers' forward
        position_ids = (torch.arange(1, device=hidden.device) + cache.get_seq_length()).unsqueeze(0)
    attention_mask = kwargs.get("attention_mask")
    if _attends_everywhere(attention_mask, rows):
        mask = None  # what create_causal_mask gives for it (~0.2 ms of a B1 step, cold in cache): see the helper
    else:
        mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids)
    position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)  # (cos, sin): (1 or B, 1, D)
    buf_k, buf_v, start, end = columns
    if mask is not None and not decode_attention._row_mask(mask, rows, end + 1 - start):
        return None
    if not decode_layers._decode_input(hidden, position_embeddings, cache, {}):
        return None
    checked = config if config._attn_implementation == decode_attention.ATTN_NAME else None
    lora_free = lora_free_forward(hidden.device)  # all base rows: ~200 LoRA wrappers need not be asked one by one
    plans, head_dims, scalings = [], [], []
    for layer in layers:
        attn, mlp = layer._modules["self_attn"], layer._modules["mlp"]
        if not decode_layers._layer_decodes(layer, attn, mlp, checked):
            return None
        plan = decode_layers._block_plan(layer, attn, mlp, hidden.device, rows, lora_free)
        if plan is None:
            return None
        plans.append(plan)
        head_dims.append(attn.head_dim)
        scalings.append(float(attn.scaling))
    hidden = _KERNEL.decode_stack(hidden, plans, buf_k, buf_v, start, end, mask, *position_embeddings, head_dims,
                                  scalings, decode_layers._MAX_ROWS)
    cache.advance()
    return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=cache)


def _attends_everywhere(attention_mask, rows: int) -> bool:
    """A 2-D padding mask (rows, L) of integers or bools with no position left out: the one new token of each row then
    attends to every cached position (all are older), and transformers' ``create_causal_mask`` returns no mask for it
    (SDPA's causal skip; the decode attention's result is the same bits for no mask and an all-True one). Not a missing
    mask: transformers may then read packed sequences from ``position_ids``."""
    return (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[0] == rows
            and attention_mask.dtype in (torch.int64, torch.int32, torch.bool) and bool(attention_mask.all()))


@functools.lru_cache(maxsize=None)
def _is_llama_model_code(cls: type) -> bool:
    from transformers.models.llama.modeling_llama import LlamaModel

    return decode_layers._same_source(inspect.unwrap(cls.forward), inspect.unwrap(LlamaModel.forward))


def _lean_class(cls: type) -> type:
    """The stack subclass of ``cls``."""
    return decode_layers.forward_subclass(cls, _lean, "Stacked", _stack_forward, __name__,
                                          f"``{cls.__name__}`` with decode steps through ``decode_stack``.")


def install(model: nn.Module, kernel: ModuleType) -> int:
    """Switch every Llama-code decoder model inside ``model`` whose layers are lean (``decode_layers.install`` ran
    first) to its stack subclass; returns how many."""
    global _KERNEL
    lean_layers = tuple(decode_layers._lean.values())
    models = [m for m in model.modules() if type(m) not in _lean.values()
              and isinstance(getattr(m, "layers", None), nn.ModuleList) and len(m.layers) > 0
              and all(type(layer) in lean_layers for layer in m.layers)
              and all(hasattr(m, name) for name in ("embed_tokens", "norm", "rotary_emb", "config"))
              and _is_llama_model_code(type(m))]
    if models:
        _KERNEL = kernel
    for m in models:
        capture = _capture_registry()
        recorded = capture.get(m) if capture is not None else None  # what transformers records, by class name
        m.__class__ = _lean_class(type(m))
        if recorded:
            capture[m] = recorded
    return len(models)


def _capture_registry():
    """transformers' registry of the outputs each model class records (``output_hidden_states`` ...), keyed by the
    class's name: the subclass must be entered too, or its outputs would silently not be recorded. None where
    this transformers has no such registry."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        return None
    return _CAN_RECORD_REGISTRY


def uninstall(model: nn.Module) -> int:
    """Back to transformers' classes."""
    return decode_layers.restore_classes(model, _lean)
