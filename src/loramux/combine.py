"""``add_weighted_adapter``: a new adapter made from loaded ones, with every PEFT recipe.

Per layer, with s_i the scaling of adapter i, B'_i = s_i B_i its stored (scaled) B, w_i its weight:

    cat:       A = [w_1 A_1; w_2 A_2; ...],  B = [B'_1, B'_2, ...]     exact: sum_i w_i s_i B_i A_i
    linear, ties, dare_linear, dare_ties, magnitude_prune (one rank for all adapters):
               A = merge({A_i}, sign(w_i s_i) sqrt|w_i s_i|),  B = merge({B_i}, sqrt|w_i s_i|)
               (PEFT's factor-wise formulas, which also mix cross terms B_i A_j)
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd:
               the best rank-k approximation of merge({s_i B_i A_i}, w_i)   (k = svd_rank or the largest rank)

``merge`` is ``merge_methods.merge`` (task arithmetic, TIES, DARE, magnitude pruning). The result has
scaling 1, as PEFT's does. Layers are visited in the base model's module order and, within one,
adapters in the order given (A tensors before B tensors): PEFT's order, so DARE's random masks are
the same ones PEFT draws after the same ``torch.manual_seed``. PEFT first builds the new adapter's
layers, which draws from the global generator too (``nn.Linear`` init, ``randn`` for embeddings,
then ``init_lora_weights`` of the first adapter); ``replay_peft_init_draws`` makes the same draws.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

import torch
from torch import nn

from loramux.config_schema import is_number, show
from loramux.errors import AdapterConfigError
from loramux.layers import delta_weight_layout, layer_shape
from loramux.loading import LoadPlan
from loramux.merge_methods import METHODS, SIGN_METHODS, merge
from loramux.merging import delta_weight
from loramux.slots import SlotWeights

SVD_TYPES = tuple(f"{m}_svd" for m in ("ties", "dare_linear", "dare_ties", "magnitude_prune")) + ("svd",)
COMBINATION_TYPES = ("cat",) + METHODS + SVD_TYPES
_PRUNING = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
logger = logging.getLogger(__name__)


def _fail(message: str) -> AdapterConfigError:
    return AdapterConfigError(f"add_weighted_adapter: {message}")


def adapter_rank(info) -> int:
    """The rank PEFT allocates for an adapter: r, or the largest of r and its rank_pattern values."""
    cfg = info.config
    if cfg is None:
        return info.rank
    return max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r


def check_arguments(infos, weights: Sequence[float], combination_type: str, density, majority_sign_method: str,
                    svd_rank) -> tuple[str, int]:
    """Validate the call; return PEFT's effective combination type (``linear`` for one adapter) and new rank."""
    if combination_type not in COMBINATION_TYPES:
        raise _fail(f"combination_type {combination_type!r} is not one of {list(COMBINATION_TYPES)}")
    for i, w in enumerate(weights):
        if not is_number(w) or not math.isfinite(w):
            raise _fail(f"weights[{i}] = {show(w)} must be a finite number")
    if any(getattr(info.config, "target_parameters", ()) for info in infos):
        raise _fail("adapters with fused-experts LoRA (target_parameters) cannot be combined (PEFT refuses them too)")
    if any(info.modules_to_save for info in infos):
        raise _fail("adapters with modules_to_save cannot be combined (their copies are whole modules, not deltas)")
    base_type = combination_type.removesuffix("_svd")
    if base_type in _PRUNING:
        if not is_number(density) or not 0 < density <= 1:
            raise _fail(f"combination_type {combination_type!r} needs density in (0, 1] (the fraction of values kept), "
                        f"got {show(density)}")
        if majority_sign_method not in SIGN_METHODS:
            raise _fail(f"majority_sign_method {show(majority_sign_method)} is not one of {list(SIGN_METHODS)}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise _fail(f"svd_rank must be a positive integer or None, got {show(svd_rank)}")
    if len(infos) == 1:
        combination_type = "linear"  # PEFT: one adapter is only rescaled, whatever the type asked for
    ranks = [adapter_rank(info) for info in infos]
    if combination_type in METHODS:
        if len(set(ranks)) != 1:
            raise _fail(f"combination_type {combination_type!r} needs adapters of one rank, got {ranks}; use 'cat' or "
                        "an '*_svd' type")
        return combination_type, ranks[0]
    if combination_type == "cat":
        return combination_type, sum(ranks)
    return combination_type, svd_rank or max(ranks)


def replay_peft_init_draws(modules: Sequence[str], base_modules: Mapping[str, nn.Module], rank: int,
                           init_lora_weights) -> None:
    """Draw from the global generator what PEFT's ``inject_adapter`` draws when it builds the new adapter.

    Per layer, in module order: ``nn.Linear(d_in, r)`` and ``nn.Linear(r, d_out)`` init (uniform, r*d_in and
    d_out*r values), then ``kaiming_uniform_`` of A again (``init_lora_weights=True``) or ``normal_``
    ("gaussian"); embeddings: ``randn`` (r, n) and (d, r), then ``normal_`` of B for any truthy init."""
    with torch.no_grad():
        for name in modules:
            base = base_modules[name]
            d_in, d_out = layer_shape(base)
            if isinstance(base, nn.Embedding):
                torch.empty(rank, d_in).normal_()
                torch.empty(d_out, rank).normal_()
                if init_lora_weights is True or init_lora_weights == "gaussian":
                    torch.empty(d_out, rank).normal_()
            else:
                torch.empty(rank, d_in).uniform_()
                torch.empty(d_out, rank).uniform_()
                if init_lora_weights is True:
                    torch.empty(rank, d_in).uniform_()
                elif init_lora_weights == "gaussian":
                    torch.empty(rank, d_in).normal_()


def combine_layer(sources: list[tuple[SlotWeights, float, float]], combination_type: str, base: nn.Module, rank: int,
                  density: float | None = None, majority_sign_method: str = "total",
                  generator: torch.Generator | None = None, svd_clamp: float | None = None,
                  svd_full_matrices: bool = True, svd_driver: str | None = None) -> SlotWeights:
    """``sources``: (slot weights, weight w_i, scaling s_i) of each adapter present in this layer."""
    if any(not isinstance(e, SlotWeights) for e, _, _ in sources):
        raise _fail("fused-experts LoRA (target_parameters) cannot be combined (PEFT refuses it too)")
    if any(e.dora_scale is not None or e.bias is not None for e, _, _ in sources):
        raise _fail("DoRA and lora_bias adapters cannot be combined (PEFT refuses them too)")
    embedding = isinstance(base, nn.Embedding)
    ref = sources[0][0]
    dtype, device = ref.B.dtype, ref.B.device
    # A in PEFT's (r, d_in) orientation (embeddings store it (num_embeddings, r)), B unscaled and contiguous
    As = [(e.A.float().T if embedding else e.A.float()).contiguous() for e, _, _ in sources]
    if combination_type == "cat":
        A = torch.cat([w * a for a, (_, w, _) in zip(As, sources)], dim=0)        # (sum r, d_in)
        B = torch.cat([e.B.float() for e, _, _ in sources], dim=1)                 # (d_out, sum r)
    elif combination_type in METHODS:
        if len({a.shape[0] for a in As}) != 1:
            raise _fail(f"combination_type {combination_type!r} needs one rank per layer, got "
                        f"{[a.shape[0] for a in As]} (rank_pattern); use 'cat' or an '*_svd' type")
        Bs = [(e.B.float() / s).contiguous() for e, _, s in sources]               # (d_out, r) each, unscaled
        w_A = [math.copysign(math.sqrt(abs(w * s)), w * s) for _, w, s in sources]
        w_B = [math.sqrt(abs(w * s)) for _, w, s in sources]
        A = merge(combination_type, As, w_A, density, majority_sign_method, generator)   # (r, d_in)
        B = merge(combination_type, Bs, w_B, density, majority_sign_method, generator)   # (d_out, r)
    else:
        # deltas in the base weight's layout ((d_out, d_in); Conv1D and embeddings transposed), where PEFT draws
        deltas = [delta_weight_layout(base, delta_weight(e, embedding)).contiguous() for e, _, _ in sources]
        method = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
        delta = delta_weight_layout(base, merge(method, deltas, [w for _, w, _ in sources], density,
                                                majority_sign_method, generator))      # (d_out, d_in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
        B, A = U[:, :rank] * S[:rank], Vh[:rank]                                       # (d_out, k), (k, d_in)
        if svd_clamp is not None:
            high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
            B, A = B.clamp(-high, high), A.clamp(-high, high)
    A = A.T if embedding else A
    entry = SlotWeights(A=A.to(dtype=dtype, device=device).contiguous(), B=B.to(dtype=dtype, device=device))
    if not (bool(torch.isfinite(entry.A).all()) and bool(torch.isfinite(entry.B).all())):
        raise _fail(f"the combined weights overflow {dtype} (weights too large?)")
    return entry


def plan_combination(infos, weights: Sequence[float], wrappers: Mapping[str, nn.Module],
                     base_modules: Mapping[str, nn.Module], combination_type: str = "svd", svd_rank: int | None = None,
                     density: float | None = None, majority_sign_method: str = "total",
                     generator: torch.Generator | None = None, svd_clamp: float | None = None,
                     svd_full_matrices: bool = True, svd_driver: str | None = None) -> LoadPlan:
    """A :class:`LoadPlan` for the combination of the loaded adapters ``infos`` (nothing is changed here)."""
    combination_type, rank = check_arguments(infos, weights, combination_type, density, majority_sign_method, svd_rank)
    covered = {m for info in infos for m in info.ranks}
    modules = [m for m in base_modules if m in covered]  # the base model's order: PEFT's order
    first = infos[0].config
    if combination_type.startswith("dare") and generator is None:
        replay_peft_init_draws(modules, base_modules, rank, first.init_lora_weights if first else True)
    if first is not None and first.use_rslora:
        logger.warning("add_weighted_adapter: %s uses rsLoRA; PEFT's combined adapter keeps use_rslora and so scales "
                       "the result by sqrt(%d) on top of the combination, loramux does not (scaling 1): outputs differ "
                       "from PEFT's by that factor", infos[0].name, rank)
    plan = LoadPlan()
    for module in modules:
        wrapper = wrappers[module]
        sources = [(wrapper.slots.get(i.slot), w, i.scalings[module]) for i, w in zip(infos, weights) if module in i.ranks]
        entry = combine_layer(sources, combination_type, base_modules[module], rank, density, majority_sign_method,
                              generator, svd_clamp, svd_full_matrices, svd_driver)
        plan.lora[module] = entry
        plan.ranks[module], plan.scalings[module] = entry.B.shape[1], 1.0
    if first is not None:  # PEFT's config of the result: the first adapter's, with r = lora_alpha = the new rank
        plan.config = dataclasses.replace(first, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={},
                                          target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
                                          source="<add_weighted_adapter>", modules_to_save=(), use_rslora=False)
    return plan
