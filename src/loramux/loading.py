"""Turning a parsed adapter into per-layer slot entries, checked against the base model.

Everything that can fail happens here, before the model is touched: ``plan_load`` returns a
:class:`LoadPlan` of ready tensors (cast, scaled, on the layer's device), and ``MultiLoraModel``
commits it in one step. So a failed load leaves the model exactly as it was.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from loramux.adapter import AdapterFile
from loramux.errors import AdapterConfigError, AdapterWeightsError, TargetModuleError
from loramux.layers import SUPPORTED_TYPES, layer_shape
from loramux.slots import SlotWeights


@dataclass
class LoadPlan:
    lora: dict[str, SlotWeights] = field(default_factory=dict)          # module name -> entry
    modules_to_save: dict[str, nn.Module] = field(default_factory=dict)  # module name -> the adapter's copy
    ranks: dict[str, int] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        lora = sum(w.nbytes for w in self.lora.values())
        copies = sum(p.numel() * p.element_size() for m in self.modules_to_save.values() for p in m.parameters())
        return lora + copies


def _check_shape(source, module_name: str, what: str, found: torch.Size, expected: tuple[int, ...]) -> None:
    if tuple(found) != expected:
        raise AdapterWeightsError(
            f"{source}: module {module_name!r}: {what} has shape {tuple(found)} but the base layer needs {expected}; "
            "the adapter was trained for a different base model (check base_model_name_or_path)")


def _dora_scale(base: nn.Module, A: torch.Tensor, B_scaled: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output-feature factor m / ||W0 + s B A||, computed once at load time (fp32).

    W0 is read in (d_out, d_in) orientation; the norm runs over d_in, as PEFT's DoraLinearLayer does.
    """
    w0 = base.weight.detach().float()
    if not isinstance(base, nn.Linear):  # Conv1D stores (d_in, d_out)
        w0 = w0.T
    # (d_out, r) @ (r, d_in) -> (d_out, d_in)
    norm = torch.linalg.norm(w0 + B_scaled.float() @ A.float(), dim=1)
    return magnitude.float() / norm


def plan_load(adapter: AdapterFile, base_modules: dict[str, nn.Module]) -> LoadPlan:
    """Check every tensor of ``adapter`` against ``base_modules`` (original names -> base layers)."""
    cfg, source = adapter.config, adapter.path / "adapter_model.safetensors"
    plan = LoadPlan()
    if isinstance(cfg.target_modules, list):
        for target in cfg.target_modules:
            if not any(name == target or name.endswith("." + target) for name in base_modules):
                raise TargetModuleError(
                    f"{adapter.path}: target module {target!r} (field target_modules) matches no module of the base "
                    f"model ({type(next(iter(base_modules.values()), None)).__name__} ...); the adapter was trained "
                    "for another architecture")
    for name, mw in adapter.modules.items():
        base = base_modules.get(name)
        if base is None:
            raise TargetModuleError(
                f"{source}: the base model has no module {name!r}; the adapter was trained for another base model")
        if not isinstance(base, SUPPORTED_TYPES):
            raise TargetModuleError(
                f"{source}: module {name!r} is a {type(base).__name__}; loramux puts LoRA on nn.Linear, "
                "transformers Conv1D and nn.Embedding only")
        for param, saved in mw.base_copy.items():
            current = getattr(base, param, None)
            if current is None or current.shape != saved.shape or not torch.allclose(current.detach().float().cpu(), saved.float(), atol=1e-6):
                raise AdapterConfigError(
                    f"{source}: the adapter carries its own {name}.{param} (e.g. a resized vocabulary) that differs from "
                    "the base model's; one shared base cannot hold it per adapter. Re-save with save_embedding_layers=False "
                    "if the base layer was not changed")
        if mw.lora_A is None:
            continue
        is_embedding = isinstance(base, nn.Embedding)
        if mw.embedding != is_embedding:
            raise AdapterWeightsError(
                f"{source}: module {name!r} is a {type(base).__name__} but the adapter stores "
                f"{'embedding' if mw.embedding else 'linear'} LoRA weights for it; wrong base model")
        d_in, d_out = layer_shape(base)
        rank = mw.lora_A.shape[0]
        _check_shape(source, name, "lora_A", mw.lora_A.shape, (rank, d_in))
        _check_shape(source, name, "lora_B", mw.lora_B.shape, (d_out, rank))
        weight = base.weight
        to = dict(dtype=weight.dtype, device=weight.device)
        scaling = cfg.scaling_for(name)
        # scaled in one copy into the layout SlotWeights keeps: (d_out, r) as a view of a contiguous (r, d_out)
        B_scaled = torch.mul(mw.lora_B.T, scaling, out=torch.empty(rank, d_out, dtype=torch.float32)).T
        bias = None
        if mw.lora_B_bias is not None:
            _check_shape(source, name, "lora_B.bias", mw.lora_B_bias.shape, (d_out,))
            bias = (mw.lora_B_bias.float() * scaling).to(**to)
        dora_scale = None
        if mw.magnitude is not None:
            if is_embedding:
                raise AdapterConfigError(f"{source}: DoRA on the embedding {name!r} is not supported by loramux")
            _check_shape(source, name, "lora_magnitude_vector", mw.magnitude.shape, (d_out,))
            dora_scale = _dora_scale(base, mw.lora_A.to(weight.device), B_scaled.to(weight.device), mw.magnitude.to(weight.device)).to(**to)
        # embeddings look rows up in A: store it (num_embeddings, r)
        A = mw.lora_A.T.contiguous() if is_embedding else mw.lora_A
        plan.lora[name] = SlotWeights(A=A.to(**to).contiguous(), B=B_scaled.to(**to), bias=bias, dora_scale=dora_scale)
        plan.ranks[name], plan.scalings[name] = rank, scaling
    _plan_modules_to_save(adapter, base_modules, plan)
    if not plan.lora and not plan.modules_to_save:
        raise AdapterWeightsError(f"{source}: no tensor of this adapter applies to the base model")
    return plan


def _plan_modules_to_save(adapter: AdapterFile, base_modules: dict[str, nn.Module], plan: LoadPlan) -> None:
    """Group the remaining keys by the ``modules_to_save`` module they belong to and build its copy."""
    source = adapter.path / "adapter_model.safetensors"
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.extra.items():
        owner = next((m for m in base_modules if key.startswith(m + ".")
                      and any(m == t or m.endswith("." + t) for t in adapter.config.modules_to_save)), None)
        if owner is None:
            raise AdapterWeightsError(
                f"{source}: unexpected tensor {key!r}: neither a LoRA weight nor part of a module listed in "
                f"modules_to_save {list(adapter.config.modules_to_save)}")
        states.setdefault(owner, {})[key[len(owner) + 1:]] = tensor
    for owner, state in states.items():
        base = base_modules[owner]
        module_copy = copy.deepcopy(base)
        try:
            module_copy.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterWeightsError(f"{source}: modules_to_save {owner!r} does not fit the base module: {exc}") from exc
        plan.modules_to_save[owner] = module_copy.requires_grad_(False)
    for target in adapter.config.modules_to_save or ():
        matched = [m for m in base_modules if m == target or m.endswith("." + target)]
        if matched and not any(m in states for m in matched):
            # PEFT would warn about missing keys and serve the base layer: silent wrong output
            raise AdapterWeightsError(
                f"{source}: modules_to_save lists {target!r} (base module {matched[0]!r}) but the file holds no "
                "weights for it; re-save the adapter with that module's weights, or drop it from modules_to_save")
