"""``add_weighted_adapter``: a new adapter made from loaded ones, with PEFT's three recipes.

Per layer, with B'_i = s_i B_i the stored (scaled) B of adapter i and w_i its weight:

    cat:    A = [w_1 A_1; w_2 A_2; ...],  B = [B'_1, B'_2, ...]      exact: sum_i w_i s_i B_i A_i
    linear: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum_i sqrt|w_i s_i| B_i   (same ranks; PEFT's
            formula, which also mixes cross terms B_i A_j)
    svd:    the best rank-k approximation of sum_i w_i B'_i A_i (k = svd_rank or the largest rank)

The result has scaling 1, as PEFT's does.
"""
from __future__ import annotations

import math

import torch

from loramux.errors import AdapterConfigError
from loramux.merging import delta_weight
from loramux.slots import SlotWeights

COMBINATION_TYPES = ("cat", "linear", "svd")


def combine_layer(entries: list[tuple[SlotWeights, float, float]], combination_type: str, embedding: bool,
                  svd_rank: int | None) -> SlotWeights:
    """``entries``: (slot weights, weight w_i, scaling s_i) of each source adapter present in this layer."""
    if any(e.dora_scale is not None or e.bias is not None for e, _, _ in entries):
        raise AdapterConfigError("add_weighted_adapter: DoRA and lora_bias adapters cannot be combined (PEFT refuses them too)")
    ref = entries[0][0]
    dtype, device = ref.B.dtype, ref.B.device
    # work in the (r, d_in) orientation of A whatever the layer type
    As = [(e.A.float().T if embedding else e.A.float()) for e, _, _ in entries]
    if combination_type == "cat":
        A = torch.cat([w * a for a, (_, w, _) in zip(As, entries)], dim=0)         # (sum r, d_in)
        B = torch.cat([e.B.float() for e, _, _ in entries], dim=1)                  # (d_out, sum r)
    elif combination_type == "linear":
        if len({a.shape[0] for a in As}) != 1:
            raise AdapterConfigError(
                "add_weighted_adapter: combination_type='linear' needs adapters of one rank; use 'cat' or 'svd'")
        A = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for a, (_, w, s) in zip(As, entries))
        B = sum(math.sqrt(abs(w * s)) * (e.B.float() / s) for e, w, s in entries)
    elif combination_type == "svd":
        delta = sum(w * delta_weight(e, embedding) for e, w, _ in entries)        # (d_out, d_in)
        rank = svd_rank or max(a.shape[0] for a in As)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        B, A = U[:, :rank] * S[:rank], Vh[:rank]                                     # (d_out, k), (k, d_in)
    else:
        raise AdapterConfigError(f"add_weighted_adapter: combination_type {combination_type!r} is not one of {COMBINATION_TYPES}")
    A = A.T if embedding else A
    return SlotWeights(A=A.to(dtype=dtype, device=device).contiguous(), B=B.to(dtype=dtype, device=device))
