"""Decode-step attention through the CPU kernel (``decode_attention`` in ``csrc/decode_gemm.cpp``).

Why: at one query token per row, torch's CPU flash-attention kernel is dispatch and block set-up, not
arithmetic: ~1.4 ms per layer at B16 on the default model (~42 ms of a step whose matmuls stream in
less), ~60 us per layer at B1. The kernel does each (row, query head) in one pass over its keys/values, the
query heads of one kv head one after another on a thread (their keys/values read from memory once).

How it is used: ``install(model)`` (called by ``dense_kernel.install`` at wrap time) registers the
attention function :func:`attention_forward` with transformers under the name ``ATTN_NAME`` and
points every config of the model whose ``_attn_implementation`` is ``"sdpa"`` at it; ``uninstall``
points them back. The function takes the kernel for one query token per row (float32 CPU, no grad, no
soft-capping / position bias / sinks, a mask of one row per batch row or none) and hands everything
else, prefill included, to transformers' own ``sdpa_attention_forward``, unchanged. Masks are built
by transformers' ``sdpa_mask`` (registered under the same name), so padding, sliding windows and
chunked attention reach the kernel as the same boolean mask SDPA would get.

Semantics: ``softmax(q k^T * scaling + mask) v`` per row and query head, with grouped-query heads
(query head h reads kv head h // (Hq / Hkv)); float32, a fixed summation order per row.
"""
from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
from types import ModuleType

import torch
from torch import nn

logger = logging.getLogger(__name__)

ATTN_NAME = "loramux_sdpa"
_UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks")

# a modeling file that compares ``_attn_implementation`` with "sdpa" itself (Falcon) picks its code path by that
# name: under another name it takes its eager path, which there relies on SDPA's is_causal (no causal mask)
_BRANCHES_ON_SDPA = re.compile(r"""_attn_implementation\s*(?:==|!=|in|not in)[^\n]*["']sdpa["']""")

_kernel: ModuleType | None = None
_sdpa = None  # transformers' sdpa_attention_forward, the fallback


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query: (B, Hq, T, D), key/value: (B, Hkv, L, D);
    returns (B, T, Hq, D) and no weights, like ``sdpa_attention_forward``."""
    if (query.shape[2] != 1 or dropout or query.dtype != torch.float32 or query.device.type != "cpu"
            or key.dtype != torch.float32 or value.dtype != torch.float32 or key.shape[-1] != value.shape[-1]
            or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
            or kwargs.get("output_attentions") or any(kwargs.get(name) is not None for name in _UNSUPPORTED)
            or (attention_mask is not None and not _row_mask(attention_mask, query.shape[0], key.shape[2]))):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # (B, Hq, 1, D) x (B, Hkv, L, D) -> (B, 1, Hq, D)
    return _kernel.decode_attention(query, key, value, attention_mask, float(scaling)), None


def _row_mask(mask: torch.Tensor, batch: int, length: int) -> bool:
    """A mask the kernel takes: (1 or B, 1, 1, L), bool or float32."""
    return (mask.dim() == 4 and mask.shape[0] in (1, batch) and mask.shape[1] == 1 and mask.shape[2] == 1
            and mask.shape[3] == length and mask.dtype in (torch.bool, torch.float32) and mask.device.type == "cpu")


def _register(kernel: ModuleType) -> bool:
    global _kernel, _sdpa
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # an older or newer transformers without these: attention stays as it is
        return False
    _kernel, _sdpa = kernel, sdpa_attention_forward
    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return True


def _configs(model: nn.Module) -> list:
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(type(config), "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@functools.lru_cache(maxsize=None)
def _branches_on_sdpa(module_name: str) -> bool:
    try:
        return bool(_BRANCHES_ON_SDPA.search(inspect.getsource(sys.modules[module_name])))
    except (KeyError, OSError, TypeError):  # no source to read: assume the worst
        return True


def install(model: nn.Module, kernel: ModuleType) -> int:
    """Point the model's SDPA configs at :func:`attention_forward`; returns how many configs changed.

    Not for a model whose transformers modeling code tests the name "sdpa" itself (Falcon): renaming it
    there silently switches that model to another code path (wrong logits, tests/zoo), so it keeps SDPA."""
    configs = [c for c in _configs(model) if getattr(c, "_attn_implementation", None) == "sdpa"]
    modules = {type(m).__module__ for m in model.modules() if type(m).__module__.startswith("transformers.models.")}
    if any(_branches_on_sdpa(name) for name in modules):
        logger.debug("decode attention not installed: %s test the attention name themselves", sorted(modules))
        return 0
    if not configs or not _register(kernel):
        return 0
    for config in configs:
        config._attn_implementation = ATTN_NAME
    return len(configs)


def uninstall(model: nn.Module) -> int:
    """Back to transformers' SDPA."""
    configs = [c for c in _configs(model) if getattr(c, "_attn_implementation", None) == ATTN_NAME]
    for config in configs:
        config._attn_implementation = "sdpa"
    return len(configs)
