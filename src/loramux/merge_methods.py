"""Task-vector merge methods (TIES, DARE, magnitude pruning) over stacked tensors, as PEFT defines them.

Each takes the tensors of the adapters being combined (all one shape) and their weights, and returns
one tensor. The random ones (DARE) draw one Bernoulli mask per tensor, in the order given, from
``generator`` (``None``: torch's global generator, as PEFT does), so a seeded caller reproduces
PEFT's ``add_weighted_adapter`` exactly. With T tensors stacked on dim 0 (``t: (T, ...)``):

    task_arithmetic:  sum_i w_i t_i
    magnitude_prune:  sum_i w_i top_k(|t_i|, k = int(density * numel)) t_i
    dare_linear:      sum_i w_i (bernoulli(density) * t_i / density)
    ties:             prune by magnitude; elect a sign per element (sign of sum_i t_i, or of sum_i sign(t_i)
                      with "frequency"); mean over the i that agree with it of w_i t_i
    dare_ties:        as ties with DARE's random pruning

``density >= 1`` prunes nothing (PEFT's rule).
"""
from __future__ import annotations

from typing import Sequence

import torch

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density (expectation kept)."""
    if density >= 1:
        return t
    # a contiguous probability tensor: the mask's draws then follow t's logical (row-major) order
    probs = torch.full(t.shape, density, dtype=t.dtype, device=t.device)
    return t * torch.bernoulli(probs, generator=generator) / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()                                                  # (T, ...)
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)                      # (T, ...) bool


def merge(method: str, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float | None,
          sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine ``tensors`` (each the same shape) with ``weights`` by ``method`` (one of METHODS)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)                            # (T, ...)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))          # (T, ...)
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    mask = _majority_sign_mask(stacked, sign_method)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
