"""Picking the next token of every row from its logits, each row with its own parameters.

Plain greedy rows (temperature below 1e-5, no bias, no constraint) are one batched argmax. Every
other row is picked on its own (``_pick_one``): its ``logit_bias``, then its constraint's mask, then
the argmax or temperature, top-k, top-p and one draw from the row's own ``torch.Generator``. A seeded
request consumes exactly one draw per token from its own stream, so what its companions in the
batch do cannot change its choices.

On CPU float32 logits (the engine's case) the per-row work is numpy, not torch: a row is 49,152
logits for the default model, over torch's parallel grain, so every small torch op on it is an
OpenMP parallel region that wakes the pool. On the shared 2-core machine each wake-up cost
milliseconds (``benchmarks/bench_structured.py`` part C: a constrained row masked in torch +21 ms,
a sampled row's sort and multinomial tens of milliseconds); numpy runs in the calling thread.
Other devices and dtypes take the torch path (``_pick_one_torch``), same semantics.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from loramux.engine.constraints import NO_TOKEN_ALLOWED, checked_mask
from loramux.engine.failures import RowFailed
from loramux.engine.request import SamplingParams

NOT_FINITE = "the sampling distribution is not finite (check temperature, top_p and logit_bias)"


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request generator: seeded if asked, else from the global RNG (not reproducible)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return gen


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row (the torch path).

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
    """Next token id of each row (torch path, no bias or constraint).

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


def pick_tokens(logits: torch.Tensor, seqs: Sequence[Any]) -> list[int | BaseException]:
    """Next token of each row, or the exception that row's own computation raised.

    logits: (B, V) raw, one row per sequence (``seq.params``, ``seq.generator``, ``seq.constraint``).
    A fault is confined to its row: a NaN/inf logit, a bad constraint mask, a failed draw come back
    as that row's exception and the other rows get their tokens as if it were not there. Plain
    greedy rows (no bias, no constraint) are one batched argmax; the others go through ``_pick_one``.
    """
    out: list[int | BaseException] = [0] * logits.shape[0]
    host = _host(logits)  # (B, V) numpy view of CPU float32 logits, else None
    # (B,): NaN or +-inf anywhere fails the row
    finite = (np.isfinite(host).all(-1) if host is not None else torch.isfinite(logits).all(-1)).tolist()
    plain = [i for i, s in enumerate(seqs) if finite[i] and s.params.greedy and not s.params.logit_bias
             and s.constraint is None]
    if plain:
        every = len(plain) == len(seqs)
        if host is not None:  # the first maximum, as torch's argmax
            picks = (host if every else host[plain]).argmax(-1).tolist()  # (G, V) -> (G,)
        else:
            picks = (logits if every else logits[plain]).argmax(-1).tolist()
        for i, token in zip(plain, picks):
            out[i] = token
    done = set(plain)
    for i, seq in enumerate(seqs):
        if i in done:
            continue
        if not finite[i]:
            out[i] = RowFailed("the model produced NaN/inf logits for this row")
            continue
        try:
            out[i] = _pick_one(logits[i], seq)
        except Exception as exc:  # noqa: BLE001 - this row's fault is this row's alone
            out[i] = exc
    return out


def _host(logits: torch.Tensor) -> np.ndarray | None:
    """A zero-copy numpy view of CPU float32 logits; None elsewhere (those take the torch path)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return None
    return logits.detach().numpy()


def _pick_one(row: torch.Tensor, seq: Any) -> int:
    """One row's token (V,) -> id: bias, the constraint's mask, then greedy argmax or one draw.

    A constrained row works on the n tokens its mask allows only: ids (n,) ascending, vals (n,) their
    logits. Greedy is the first maximum of vals (the same token as a masked argmax over the row);
    sampling filters and draws over vals (the same distribution as masking the rest to -inf). A
    grammar usually allows a handful of tokens, so this is cheaper than a free row. The result
    depends on the row alone: a row picks the same token whatever shares its batch.
    """
    vals = _host(row)  # (V,)
    if vals is None:
        return _pick_one_torch(row, seq)
    params = seq.params
    ids = None
    if seq.constraint is not None:
        mask = checked_mask(seq.constraint, row.shape[0], torch.device("cpu"), require_any=False).numpy()  # (V,)
        ids = np.flatnonzero(mask)  # (n,) ascending
        if ids.size == 0:
            raise RowFailed(NO_TOKEN_ALLOWED)
        vals = vals[ids]  # (V,) -> (n,), a copy
    if params.logit_bias:
        if ids is None:
            vals = vals.copy()  # the batch's logits stay raw (logprobs read them)
        _add_bias(vals, ids, params.logit_bias)
    j = int(vals.argmax()) if params.greedy else _draw(vals, params, seq.generator)
    return int(ids[j]) if ids is not None else j


def _add_bias(vals: np.ndarray, ids: np.ndarray | None, logit_bias: Sequence[tuple[int, float]]) -> None:
    """Add ``logit_bias`` to vals in place: vals (V,) when ids is None, else vals (n,) of the allowed ids
    (a bias on a token the mask forbids changes nothing). float32 sums, as ``index_add`` would."""
    bias_ids = np.fromiter((t for t, _ in logit_bias), dtype=np.int64)  # unique, checked against V at submit
    bias = np.fromiter((b for _, b in logit_bias), dtype=vals.dtype)
    if ids is None:
        vals[bias_ids] += bias
        return
    pos = np.searchsorted(ids, bias_ids)  # where each biased id sits (or would) among the allowed ids
    hit = pos < ids.size
    hit[hit] = ids[pos[hit]] == bias_ids[hit]
    vals[pos[hit]] += bias[hit]


def _draw(vals: np.ndarray, params: SamplingParams, generator: torch.Generator) -> int:
    """One draw from ``_probs(vals, params)`` -> an index into vals (n,): one uniform from the row's
    generator, inverted through the cumulative distribution."""
    p = _probs(vals, params)  # (n,)
    cdf = np.cumsum(p)  # (n,)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))  # [0, 1)
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))  # the first index whose cdf passes u * total
    return j if j < p.size else int(np.flatnonzero(p)[-1])  # u * total rounded up to total


def _probs(vals: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, top-k, top-p: vals (n,) float32 -> (n,) float64 unnormalised probabilities, 0 where
    filtered out. Same filters as ``filter_logits``, except that top-p keeps every token tied with the
    last one it keeps (a threshold on the probability: no sort order among equal values decides)."""
    x = vals / np.float32(params.temperature)  # (n,) float32, as filter_logits
    n = x.size
    if 0 < params.top_k < n:
        kth = np.partition(x, n - params.top_k)[n - params.top_k]  # the k-th largest value
        x[x < kth] = -np.inf
    p = np.exp(x.astype(np.float64) - x.max())  # (n,)
    total = float(p.sum())
    if not math.isfinite(total) or total <= 0.0:
        raise RowFailed(NOT_FINITE)
    if params.top_p < 1.0:
        _nucleus(p, params.top_p * total)
    return p


NUCLEUS_CUT = 1e-4  # relative to the most likely token: below it, tokens are sorted only if the nucleus needs them


def _nucleus(p: np.ndarray, mass: float) -> None:
    """Top-p in place on p (n,) (unnormalised, max 1): zero every token below the smallest probability kept
    when tokens are taken in descending order until the mass strictly before one reaches ``mass``.

    Only the head (p >= NUCLEUS_CUT) is sorted when it alone holds ``mass``: the nucleus then ends inside it
    and every token below the cut is dropped anyway. A language model's distribution has a few hundred such
    tokens out of 49,152 (sorting all of them was ~2 ms per row); a flat one falls back to the full sort.
    """
    head = p[p >= NUCLEUS_CUT]
    if float(head.sum()) < mass:
        head = p
    desc = np.sort(head)[::-1]  # (h,)
    before = np.cumsum(desc) - desc  # mass strictly before each position
    keep = max(1, int(np.count_nonzero(before < mass)))  # the first always stays
    p[p < desc[keep - 1]] = 0.0


def _processed(row: torch.Tensor, seq: Any) -> torch.Tensor:
    """One row's raw logits (V,) with its logit_bias added and its constraint's mask applied (torch path)."""
    params = seq.params
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=row.device)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=row.dtype, device=row.device)
        row = row.index_add(0, ids, bias)  # a new tensor: the batch's logits stay raw (logprobs read them)
    if seq.constraint is not None:
        row = row.masked_fill(~checked_mask(seq.constraint, row.shape[0], row.device), float("-inf"))
    return row


def _pick_one_torch(row: torch.Tensor, seq: Any) -> int:
    """``_pick_one`` for logits numpy cannot view (another device, another dtype)."""
    row = _processed(row, seq)
    if seq.params.greedy:
        return int(row.argmax().item())
    probs = filter_logits(row, seq.params).softmax(-1)  # (V,)
    if not bool(torch.isfinite(probs).all()):
        raise RowFailed(NOT_FINITE)
    return int(torch.multinomial(probs, 1, generator=seq.generator).item())
