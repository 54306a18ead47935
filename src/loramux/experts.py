"""LoRA on fused MoE expert weights (PEFT ``target_parameters``), routed per row and per token.

transformers 5 stores a layer's experts as 3-D parameters (Mixtral, Qwen2-MoE, Qwen3-MoE)::

    gate_up_proj: (E, 2I, H)     down_proj: (E, H, I)      F.linear(x, W[e]) = x @ W[e].T

PEFT 0.21 puts LoRA on them with ``ParamWrapper`` (also for ``target_modules=["gate_proj", ...]``
or ``"all-linear"``, which it rewrites to ``target_parameters``). Per parameter it saves
``lora_A.weight`` (r*E, in) and ``lora_B.weight`` (out, r*E); with two parameters on one module
the wrappers nest and the first parameter (in registration order) is the inner one, saved as
``<module>.base_layer.lora_A.weight``. PEFT's delta for expert e (``get_delta_weight``)::

    A_e = A.reshape(E, r, in)[e]             # (r, in)
    B_e = B.reshape(out, r, E)[:, :, e]      # (out, r)
    W[e] <- W[e] + scaling * B_e @ A_e       # (out, in)

Here the delta stays low-rank and per token: a token routed to expert e, in a row whose adapter is
s, gets ``(x @ A_s[e].T) @ B_s[e].T`` added to that expert's projection; tokens of other rows (or
other adapters) in the same expert get theirs. The wrapper replaces the experts' forward by the
eager loop transformers itself uses, plus those deltas, only when a row of the call has an adapter
in this layer; otherwise it calls the untouched module (any experts implementation).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loramux.errors import AdapterWeightsError, TargetModuleError
from loramux.layers import _PassThrough
from loramux.mapping import current_mapping
from loramux.slots import SlotTable

# The one experts layout implemented here (transformers' Mixtral/Qwen2-MoE/Qwen3-MoE experts):
_PARAMS = ("gate_up_proj", "down_proj")
_LAYOUT = dict(is_transposed=False, has_bias=False, is_concatenated=True, has_gate=True, has_post_expert_norm=False)


@dataclass(frozen=True)
class ExpertWeights:
    """One adapter's LoRA on one fused parameter: A (E, r, in), B (E, out, r) pre-scaled."""

    A: torch.Tensor
    B: torch.Tensor


@dataclass(frozen=True)
class ExpertsSlot:
    """One adapter's LoRA on one experts module: parameter name -> weights (one or both of _PARAMS)."""

    params: dict[str, ExpertWeights]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.params.values() for t in (w.A, w.B))


def strip_base_layers(name: str) -> tuple[str, int]:
    """``m.base_layer.base_layer`` -> (``m``, 2): PEFT's nesting depth of a ParamWrapper key."""
    depth = 0
    while name.endswith(".base_layer"):
        name, depth = name[: -len(".base_layer")], depth + 1
    return name, depth


def targeted_parameters(module_name: str, module: nn.Module, targets) -> list[str]:
    """The parameters of ``module`` PEFT's ``target_parameters`` matches, in registration order
    (PEFT nests in that order: the first one is the innermost wrapper)."""
    found = []
    for pname, _ in module.named_parameters(recurse=False):
        key = f"{module_name}.{pname}"
        if any(key == t or key.endswith("." + t) for t in targets):
            found.append(pname)
    return found


def layout_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not the fused experts layout implemented here, or None."""
    for attr, want in _LAYOUT.items():
        if getattr(module, attr, want) != want:
            return f"it has {attr}={getattr(module, attr)!r} (implemented: {want!r})"
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(_PARAMS) or not hasattr(module, "act_fn"):
        return f"its parameters are {sorted(params)} (implemented: {list(_PARAMS)} and an act_fn)"
    gu, down = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0] or gu.shape[1] != 2 * down.shape[2] \
            or gu.shape[2] != down.shape[1]:
        return f"gate_up_proj {tuple(gu.shape)} / down_proj {tuple(down.shape)} are not (E, 2I, H) / (E, H, I)"
    return None


def is_router(module: nn.Module) -> bool:
    """A top-k MoE router (``MixtralTopKRouter``...): one (E, H) ``weight``, logits = F.linear(h, weight),
    every output per token. PEFT's ``all-linear`` on Mixtral/Qwen3-MoE targets it (``gate.weight``)."""
    params = dict(module.named_parameters(recurse=False))
    return set(params) == {"weight"} and params["weight"].dim() == 2 and hasattr(module, "top_k")


def plan_experts(source, config, module_name: str, module: nn.Module, nested: dict[int, object]) -> tuple[ExpertsSlot, int, float]:
    """Check and prepare one adapter's ParamWrapper LoRA on ``module``; (entry, max rank, first scaling).

    ``nested`` maps PEFT's nesting depth (number of ``.base_layer``) to the saved ModuleWeights.
    """
    params = targeted_parameters(module_name, module, config.target_parameters)
    if not params:
        raise TargetModuleError(
            f"{source}: LoRA tensors for {module_name!r} but none of its parameters matches target_parameters "
            f"{list(config.target_parameters)}; the adapter was saved for another model")
    problem = None if is_router(module) else layout_problem(module)
    if problem is not None:
        raise TargetModuleError(
            f"{source}: target_parameters LoRA on {module_name!r} ({type(module).__name__}, parameters {params}) is not "
            f"supported: {problem}. loramux implements fused MoE experts with gate_up_proj (E, 2I, H) and down_proj "
            "(E, H, I) (Mixtral, Qwen2-MoE, Qwen3-MoE); LoRA on a router or other parameter is refused")
    if sorted(nested) != list(range(len(params))):
        raise AdapterWeightsError(
            f"{source}: {module_name!r}: the file nests {len(nested)} ParamWrapper LoRA(s) (depths {sorted(nested)}) but "
            f"target_parameters matches {len(params)} parameter(s) {params} of the base module; the file is inconsistent")
    entries, ranks, scalings = {}, [], []
    for depth, mw in nested.items():
        pname = params[len(params) - 1 - depth]  # the innermost wrapper (deepest) is the first parameter
        weight = getattr(module, pname)
        n_exp, d_out, d_in = weight.shape if weight.dim() == 3 else (1, *weight.shape)  # 2-D: one "expert" (router)
        key = f"{module_name}.{pname}"
        rank = config.rank_for(key)
        for what, found, want in (("lora_A", mw.lora_A.shape, (rank * n_exp, d_in)), ("lora_B", mw.lora_B.shape, (d_out, rank * n_exp))):
            if tuple(found) != want:
                raise AdapterWeightsError(
                    f"{source}: {key}: {what} has shape {tuple(found)} but {n_exp} experts of rank {rank} (field 'r' / "
                    f"'rank_pattern') on a {tuple(weight.shape)} parameter need {want}; wrong base model or config")
        scaling = config.scaling_for(key)
        A = mw.lora_A.float().reshape(n_exp, rank, d_in)                                     # (E, r, in)
        B = (mw.lora_B.float().reshape(d_out, rank, n_exp).permute(2, 0, 1) * scaling)       # (E, out, r)
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise AdapterWeightsError(f"{source}: {key}: lora_B is not finite once scaled by {scaling:.3g} (lora_alpha / "
                                      "alpha_pattern overflow); lower the alpha")
        to = dict(dtype=weight.dtype, device=weight.device)
        entries[pname] = ExpertWeights(A=A.to(**to).contiguous(), B=B.to(**to).contiguous())
        ranks.append(rank)
        scalings.append(scaling)
    return ExpertsSlot(entries), max(ranks), scalings[0]


class ExpertsLayer(_PassThrough):
    """Fused MoE experts plus per-slot LoRA on ``gate_up_proj`` / ``down_proj``.

    Never merged into W0 (``merge_adapter`` leaves experts alone and rows keep routing per token),
    so it also applies while another adapter is merged; ``fold`` writes a slot's delta into the base
    parameters for ``merge_and_unload``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = SlotTable()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        mapping = current_mapping()
        router = "gate_up_proj" not in self.base_layer._parameters
        if mapping is None or self.slots.count == 0 or kwargs or len(args) != (0 if router else 2):
            return self.base_layer(hidden_states, *args, **kwargs)
        # hidden_states: (N, H), N = rows * T flattened row-major: token n belongs to row n // T
        per_token = mapping.for_rows(hidden_states.shape[0])
        present = [(p, self.slots.get(s)) for p, s in enumerate(per_token.present) if self.slots.get(s) is not None]
        if not present:
            return self.base_layer(hidden_states, *args)
        pos = per_token.positions(hidden_states.device)  # (N,) index into present (base rows: past the end)
        if router:
            return self._route(hidden_states, pos, present)
        return self._eager(hidden_states, *args, pos, present)

    def _route(self, h, pos, present):
        """Router: each adapter's tokens through the router with W + s B A (PEFT's math), the rest through W.

        Outputs (logits (N, E), scores (N, k), indices (N, k)) are per token, so they are scattered back."""
        base = self.base_layer
        outs = list(base(h))
        for p, entry in present:
            w = entry.params["weight"]
            sel = (pos == p).nonzero()[:, 0]
            if sel.numel() == 0:
                continue
            proxy = _with_weight(base, base.weight + w.B[0] @ w.A[0])   # (E, r) @ (r, H) -> (E, H)
            for i, part in enumerate(proxy(h[sel])):
                outs[i] = outs[i].index_copy(0, sel, part.to(outs[i].dtype))
        return tuple(outs)

    def _eager(self, h, top_k_index, top_k_weights, pos, present):
        base = self.base_layer
        n_exp = base.gate_up_proj.shape[0]
        out = torch.zeros_like(h)                                                  # (N, H)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=n_exp + 1).permute(2, 1, 0)  # (E+1, k, N)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == n_exp:
                continue
            top_k_pos, tok = torch.where(mask[e])
            x = h[tok]                                                             # (n_e, H)
            gu = F.linear(x, base.gate_up_proj[e])                                 # (n_e, 2I)
            gu = self._add_delta(gu, x, pos[tok], present, "gate_up_proj", e)
            a = base._apply_gate(gu) if hasattr(base, "_apply_gate") else _gate(base, gu)  # (n_e, I)
            y = F.linear(a, base.down_proj[e])                                     # (n_e, H)
            y = self._add_delta(y, a, pos[tok], present, "down_proj", e)
            y = y * top_k_weights[tok, top_k_pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    @staticmethod
    def _add_delta(y, x, tok_pos, present, pname: str, e: int):
        for p, entry in present:
            w = entry.params.get(pname)
            if w is None:
                continue
            sel = (tok_pos == p).nonzero()[:, 0]
            if sel.numel() == 0:
                continue
            # (n_s, in) @ (in, r) -> (n_s, r) @ (r, out) -> (n_s, out)
            y = y.index_add(0, sel, (x[sel] @ w.A[e].T) @ w.B[e].T)
        return y

    @torch.no_grad()
    def fold(self, slot: int) -> None:
        """W[e] += B[e] @ A[e] for every expert, for the slot's parameters (merge_and_unload)."""
        entry = self.slots.get(slot)
        if entry is None:
            return
        for pname, w in entry.params.items():
            param = getattr(self.base_layer, pname)
            delta = torch.bmm(w.B.float(), w.A.float())  # (E, out, r) @ (E, r, in) -> (E, out, in)
            param.add_((delta if param.dim() == 3 else delta[0]).to(param.dtype))

    def extra_repr(self) -> str:
        return f"slots={self.slots.occupied()}"


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A shallow twin of ``module`` whose ``weight`` is ``weight``: the original is never mutated, so
    other threads running it at the same time are unaffected."""
    twin = copy.copy(module)
    twin.__dict__["_parameters"] = {**module._parameters, "weight": weight}
    return twin


def _gate(base: nn.Module, gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return base.act_fn(gate) * up

