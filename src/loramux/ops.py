"""The LoRA delta for a batch whose rows use different adapters: a reference and the fast path.

Semantics (what every implementation must compute), for a wrapped layer with base output ``y0``::

    for each row b:                                  # x: (B, T, d_in), y0: (B, T, d_out)
        w = weights of slot[b] in this layer          # None for "__base__" or an uncovered layer
        if w is None: out[b] = y0[b]; continue
        h = x[b] @ w.A.T                              # (T, r)   embeddings: h = w.A[ids[b]]
        d = h @ w.B.T (+ w.bias)                      # (T, d_out), B and bias pre-scaled
        if w.dora_scale is not None:                  # DoRA: g * (W0 x + s B A x) + bias
            d = (w.dora_scale - 1) * (y0[b] - base_bias) + w.dora_scale * d
        out[b] = y0[b] + d

``lora_delta_reference`` is that loop, literally. ``apply_lora`` is the fast path: rows are grouped
by slot once per call (``BatchMapping.groups``), so each layer does two matmuls per distinct
adapter, on a view when the group's rows are contiguous, and nothing for rows of the base model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loramux.mapping import BatchMapping
from loramux.slots import SlotTable, SlotWeights


def _low_rank(x: torch.Tensor, w: SlotWeights, embedding: bool) -> torch.Tensor:
    # x: (..., d_in) -> (..., r); embeddings: ids (...) -> (..., r)
    h = F.embedding(x, w.A) if embedding else x @ w.A.T
    # (..., r) -> (..., d_out)
    return torch.addmm(w.bias, h.reshape(-1, h.shape[-1]), w.B.T).view(*h.shape[:-1], -1) if w.bias is not None else h @ w.B.T


def _delta(x: torch.Tensor, y0: torch.Tensor, w: SlotWeights, embedding: bool, base_bias: torch.Tensor | None) -> torch.Tensor:
    d = _low_rank(x, w, embedding)
    if w.dora_scale is not None:
        y_no_bias = y0 if base_bias is None else y0 - base_bias
        d = (w.dora_scale - 1) * y_no_bias + w.dora_scale * d
    return d


def lora_delta_reference(x: torch.Tensor, y0: torch.Tensor, table: SlotTable, row_slots: tuple[int, ...],
                         embedding: bool = False, base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The docstring's loop, row by row: slow, obvious, the oracle for ``apply_lora``."""
    out = y0.clone()
    for b, slot in enumerate(row_slots):
        w = table.get(slot)
        if w is not None:
            out[b] = y0[b] + _delta(x[b], y0[b], w, embedding, base_bias)
    return out


def apply_lora(y: torch.Tensor, x: torch.Tensor, table: SlotTable, mapping: BatchMapping,
               embedding: bool = False, base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Add each row's adapter delta to the base output ``y`` (B, ..., d_out), in place, and return it.

    Groups touch disjoint rows, so a DoRA group may read ``y`` for its rows after other groups wrote.
    """
    mapping = mapping.for_rows(x.shape[0])
    for group in mapping.groups(x.device):
        w = table.get(group.slot)
        if w is None:
            continue
        if group.covers_all:
            d = _delta(x, y, w, embedding, base_bias)
            y = y + d if y.requires_grad else y.add_(d)
        elif isinstance(group.rows, slice):
            # (b_group, ..., d_in) view -> (b_group, ..., d_out), added into the same rows of y
            y[group.rows] += _delta(x[group.rows], y[group.rows], w, embedding, base_bias)
        else:
            # gather (b_group, ..., d_in) -> scatter-add (b_group, ..., d_out)
            y.index_add_(0, group.rows, _delta(x[group.rows], y[group.rows], w, embedding, base_bias))
    return y
