"""Picking the next token of every row from its logits, each row with its own parameters.

Greedy rows (temperature 0) are one batched argmax. Sampled rows go through temperature, top-k,
top-p, then a draw from the row's own ``torch.Generator``: a seeded request consumes exactly one
draw per token from its own stream, so what its companions in the batch do cannot change its
choices (up to the float noise of batching itself).
"""
from __future__ import annotations

from typing import Sequence

import torch

from loramux.engine.request import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request generator: seeded if asked, else from the global RNG (not reproducible)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return gen


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row.

    logits: (V,) float -> (V,) float32, -inf where filtered out.
    """
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]  # the k-th largest value
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (V,), (V,)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token id of each row.

    logits: (B, V) for the last position of each row; params/generators: one per row (a
    generator is only used, and must be given, for rows with temperature > 0).
    """
    out = [0] * logits.shape[0]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        # (G, V) -> (G,)
        picks = logits[greedy].argmax(-1).tolist() if len(greedy) < len(params) else logits.argmax(-1).tolist()
        for i, token in zip(greedy, picks):
            out[i] = token
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = filter_logits(logits[i], p).softmax(-1)  # (V,)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
