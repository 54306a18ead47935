"""Log-probabilities of chosen tokens and their top-k alternatives.

Taken from ``log_softmax`` of the raw model logits (before logit_bias, constraint masks and
temperature), as vLLM does by default. Only rows that ask pay for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its logprob, and the ``top`` (token_id, logprob) alternatives, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """One ``TokenLogprob`` per row.

    logits: (N, V) raw logits, row j predicts ``tokens[j]``; k: alternatives kept (0 = none).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    idx = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)
    chosen = logp.gather(1, idx.unsqueeze(1)).squeeze(1).tolist()  # (N,)
    if k > 0:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (N, k)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(int(t), float(c), top) for t, c, top in zip(tokens, chosen, tops)]
