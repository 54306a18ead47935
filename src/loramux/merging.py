"""Folding one adapter into W0 (merge) and taking it out again (unmerge), layer by layer.

Merged, a batch that uses only that adapter runs at the plain model's speed. The math, in the base
layer's (d_out, d_in) orientation:

    LoRA:  W <- W0 + B' A               (B' = scaling * B, as stored in the slot)
    DoRA:  W <- g * (W0 + B' A)         (g = magnitude / ||W0 + B' A||, per output row)
    bias:  b <- b0 + bias'              (lora_bias)

Unmerge applies the inverse, which restores W0 to within fp32 rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from loramux.layers import LoraLayer, delta_weight_layout
from loramux.slots import SlotWeights


def delta_weight(entry: SlotWeights, embedding: bool) -> torch.Tensor:
    """B' A as a (d_out, d_in) matrix, in fp32 (embeddings: (dim, num_embeddings))."""
    A = entry.A.float().T if embedding else entry.A.float()  # (r, d_in)
    return entry.B.float() @ A


def merge_layer(layer: LoraLayer, entry: SlotWeights) -> None:
    base = layer.base_layer
    if getattr(base, "is_quantized", False):  # loramux.quantize: int8 W0 cannot hold W0 + B'A at its scales
        from loramux.errors import MergedAdapterError

        raise MergedAdapterError(f"cannot merge an adapter into the int8 base layer {type(base).__name__}; serve it "
                                 "unmerged (mixed batches cost little), or load the base in float32 to merge")
    with torch.no_grad():
        w = base.weight.float()
        delta = delta_weight_layout(base, delta_weight(entry, layer.is_embedding))
        merged = w + delta
        if entry.dora_scale is not None:
            merged = _scale_rows(base, merged, entry.dora_scale.float())
        base.weight.copy_(merged.to(base.weight.dtype))
        if entry.bias is not None:
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros_like(entry.bias), requires_grad=False)
                layer._merge_created_bias = True
            base.bias.add_(entry.bias)


def unmerge_layer(layer: LoraLayer, entry: SlotWeights) -> None:
    base = layer.base_layer
    with torch.no_grad():
        w = base.weight.float()
        if entry.dora_scale is not None:
            w = _scale_rows(base, w, 1.0 / entry.dora_scale.float())
        w = w - delta_weight_layout(base, delta_weight(entry, layer.is_embedding))
        base.weight.copy_(w.to(base.weight.dtype))
        if entry.bias is not None:
            if getattr(layer, "_merge_created_bias", False):
                base.bias = None
                layer._merge_created_bias = False
            else:
                base.bias.sub_(entry.bias)


def _scale_rows(base: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # scale: (d_out,) per output feature; nn.Linear weight is (d_out, d_in), Conv1D (d_in, d_out)
    return weight * scale[:, None] if isinstance(base, nn.Linear) else weight * scale[None, :]
