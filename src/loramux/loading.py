"""Turning a parsed adapter into per-layer slot entries, checked against the base model.

Everything that can fail happens here, before the model is touched: ``plan_load`` returns a
:class:`LoadPlan` of ready tensors (cast, scaled, on the layer's device), and ``MultiLoraModel``
commits it in one step. So a failed load leaves the model exactly as it was.
"""
from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from loramux.adapter import AdapterConfig, AdapterFile, key_role, pattern_key
from loramux.b_scaling import scaled_transposed
from loramux.config_schema import show
from loramux.errors import AdapterConfigError, AdapterError, AdapterWeightsError, TargetModuleError
from loramux.experts import plan_experts, strip_base_layers
from loramux.layers import SUPPORTED_TYPES, layer_shape, weight_dtype_device
from loramux.slots import SlotTable, SlotWeights
from loramux.targets import check_target

logger = logging.getLogger(__name__)


@dataclass
class LoadPlan:
    lora: dict[str, SlotWeights] = field(default_factory=dict)          # module name -> entry
    modules_to_save: dict[str, nn.Module] = field(default_factory=dict)  # module name -> the adapter's copy
    ranks: dict[str, int] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)
    config: AdapterConfig | None = None  # the adapter's parsed config, kept on its AdapterInfo

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


def _check_targets(cfg: AdapterConfig, base_modules: dict[str, nn.Module], where) -> None:
    if isinstance(cfg.target_modules, list):
        for target in cfg.target_modules:
            if not any(name == target or name.endswith("." + target) for name in base_modules):
                raise TargetModuleError(
                    f"{where}: target module {target!r} (field target_modules) matches no module of the base "
                    f"model ({type(next(iter(base_modules.values()), None)).__name__} ...); the adapter was trained "
                    "for another architecture")


def _base_module(source, name: str, base_modules: dict[str, nn.Module]) -> nn.Module:
    base = base_modules.get(name)
    if base is None:
        raise TargetModuleError(
            f"{source}: the base model has no module {name!r}; the adapter was trained for another base model")
    if not isinstance(base, SUPPORTED_TYPES):
        raise TargetModuleError(
            f"{source}: module {name!r} is a {type(base).__name__}; loramux puts LoRA on nn.Linear, "
            "transformers Conv1D and nn.Embedding only")
    check_target(source, name, base, base_modules)  # rows must be told apart in it (targets.py)
    return base


def _param_lora(cfg: AdapterConfig, name: str, base_modules: dict[str, nn.Module]) -> str | None:
    """The module a PEFT ParamWrapper key belongs to (``m`` for ``m.base_layer...``), or None for plain LoRA."""
    if not cfg.target_parameters:
        return None
    stripped, depth = strip_base_layers(name)
    base = base_modules.get(stripped)
    if base is None or not (depth or not isinstance(base, SUPPORTED_TYPES)):
        return None
    return stripped


def _owner(key: str, base_modules: dict[str, nn.Module], modules_to_save) -> str | None:
    """The modules_to_save module that ``key`` (a parameter name) belongs to, or None."""
    return next((m for m in base_modules if key.startswith(m + ".")
                 and any(m == t or m.endswith("." + t) for t in modules_to_save)), None)


def _unexpected(source, key: str, cfg: AdapterConfig) -> AdapterWeightsError:
    return AdapterWeightsError(
        f"{source}: unexpected tensor {key!r}: neither a LoRA weight nor part of a module listed in "
        f"modules_to_save {list(cfg.modules_to_save)}")


def check_against_base(cfg: AdapterConfig, specs: dict, source, base_modules: dict[str, nn.Module]) -> None:
    """Every declared tensor (``specs``: key -> st_header.TensorSpec) fits ``base_modules``, checked from the
    file's header before its data is read: a file for another model is refused without allocating its tensors."""
    _check_targets(cfg, base_modules, source.parent)
    lora_dims: dict[tuple[str, bool], tuple[int, int, int]] = {}  # (module, embedding) -> its _lora_dims
    for key, spec in specs.items():
        module, role, embedding = key_role(key)
        if role == "extra":
            owner = _owner(module, base_modules, cfg.modules_to_save)
            if owner is None:
                raise _unexpected(source, module, cfg)
            expected = _unwrapped_state(base_modules[owner]).get(module[len(owner) + 1:])
            if expected is None:
                raise AdapterWeightsError(f"{source}: modules_to_save {owner!r} has no parameter or buffer "
                                          f"{module[len(owner) + 1:]!r} (tensor {key!r}); wrong base model")
            _check_shape(source, owner, module[len(owner) + 1:], spec.shape, tuple(expected.shape))
            continue
        if role.startswith("base_layer."):
            if _param_lora(cfg, module, base_modules) is not None:
                continue
            base = _base_module(source, module, base_modules)
            current = getattr(base, role[len("base_layer."):], None)
            if current is None or tuple(current.shape) != spec.shape:
                raise AdapterConfigError(
                    f"{source}: the adapter carries its own {module}.{role[len('base_layer.'):]} (e.g. a resized "
                    "vocabulary) that differs from the base model's; one shared base cannot hold it per adapter")
            continue
        dims = lora_dims.get((module, embedding))
        if dims is None:
            if _param_lora(cfg, module, base_modules) is not None:
                continue  # fused-experts LoRA: checked by experts.plan_experts once the tensors are read
            dims = lora_dims[(module, embedding)] = _lora_dims(cfg, source, module, embedding, base_modules)
        d_in, d_out, rank = dims
        expected = {"lora_A": (rank, d_in), "lora_B": (d_out, rank), "lora_B_bias": (d_out,), "magnitude": (d_out,)}[role]
        _check_shape(source, module, _WHAT.get(role, role), spec.shape, expected)


_WHAT = {"lora_B_bias": "lora_B.bias", "magnitude": "lora_magnitude_vector"}  # a role as PEFT's tensor name says it


def _lora_dims(cfg: AdapterConfig, source, module: str, embedding: bool, base_modules: dict[str, nn.Module]) -> tuple[int, int, int]:
    """(d_in, d_out, rank) of LoRA ``module``, once every check of the module itself passed (asked once per
    module, not per tensor: a load's A and B of one module share these checks)."""
    base = _base_module(source, module, base_modules)
    if any(module == t or module.endswith("." + t) for t in cfg.modules_to_save):
        raise TargetModuleError(f"{source}: module {module!r} is both a LoRA target and in modules_to_save of this "
                                "adapter; PEFT trains one or the other, re-save the adapter with only one")
    if cfg.target_modules == "all-linear" and not isinstance(base, (nn.Linear,) + tuple(t for t in SUPPORTED_TYPES if t is not nn.Embedding)):
        raise AdapterWeightsError(
            f"{source}: module {module!r} is a {type(base).__name__} but target_modules is 'all-linear', which PEFT "
            "expands to linear layers only (it would ignore these weights); fix target_modules")
    if cfg.target_modules is not None and not cfg.targets(module):
        # PEFT never creates this layer, so it drops these weights with a warning: serving them would
        # differ from PEFT, serving without them would differ from the weights; refuse
        raise AdapterWeightsError(
            f"{source}: module {module!r} has LoRA weights but the config does not target it (fields "
            "target_modules / layers_to_transform / exclude_modules / modules_to_save); PEFT would ignore them. "
            "The config and the weights disagree: fix target_modules or re-save the adapter")
    if embedding != isinstance(base, nn.Embedding):
        raise AdapterWeightsError(
            f"{source}: module {module!r} is a {type(base).__name__} but the adapter stores "
            f"{'embedding' if embedding else 'linear'} LoRA weights for it; wrong base model")
    d_in, d_out = layer_shape(base)
    return d_in, d_out, cfg.rank_for(module)


def _plan_tensors(plan: LoadPlan) -> list[tuple[str, str, torch.Tensor]]:
    """(module, what, tensor) for every tensor of the plan's plain LoRA entries, in plan order."""
    return [(name, what, t) for name, e in plan.lora.items() if isinstance(e, SlotWeights)
            for what, t in (("lora_A", e.A), ("scaled lora_B", e.B), ("scaled lora_B.bias", e.bias),
                            ("DoRA magnitude / ||W0 + B A||", e.dora_scale)) if t is not None]


def _check_scaled(source, plan: LoadPlan, cfg: AdapterConfig, checked: set[int], stacks: list[torch.Tensor] = ()) -> None:
    """After scaling and the cast to the base dtype a finite B can overflow (alpha 1e30, or float16's 65504).

    Any inf/NaN makes a tensor's sum non-finite, so one stacked check covers the whole plan; only when it
    fails is each tensor checked exactly, to name the module (as ``adapter._check_finite`` does). Tensors
    in ``checked`` (ids of the file's own tensors that read_adapter already found finite, kept as they
    were: A in the base dtype; and the scaled B inside one of ``stacks``, which are summed whole, one
    reduction for ~30 modules) are not summed on their own."""
    tensors = [(name, what, t) for name, what, t in _plan_tensors(plan) if id(t) not in checked]
    sums = [t.sum(dtype=torch.float32) for t in stacks] + [t.sum(dtype=torch.float32) for _, _, t in tensors]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    for name, what, tensor in _plan_tensors(plan):
        if not bool(torch.isfinite(tensor).all()):
            field = "alpha_pattern" if pattern_key(list(cfg.alpha_pattern), name) is not None else "lora_alpha"
            raise AdapterWeightsError(
                f"{source}: module {name!r}: {what} is not finite once scaled by {field} (scaling "
                f"{plan.scalings[name]:.3g}) and cast to the base "
                "dtype (it overflows); lower lora_alpha/alpha_pattern, or use a float32 base model")


def plan_load(adapter: AdapterFile, base_modules: dict[str, nn.Module], *, reuse_tensors: bool = False) -> LoadPlan:
    """Check every tensor of ``adapter`` against ``base_modules`` (original names -> base layers).

    Every failure is an ``AdapterError``: a bare builtin from a case no check names is wrapped (and its
    traceback logged at debug level), so callers catch one family and the model is never touched.

    ``reuse_tensors=True`` says the adapter's tensors are this plan's alone (read for this load, never
    used again, even if the plan fails): float32 ``lora_B`` tensors that share no bytes with others
    (``AdapterFile.disjoint``) are then scaled and transposed in their own memory (``b_scaling.py``)
    rather than into a fresh allocation."""
    try:
        return _plan_load(adapter, base_modules, reuse_tensors)
    except AdapterError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError, re.error) as exc:
        logger.debug("unexpected error while planning %s", adapter.path, exc_info=True)
        raise AdapterWeightsError(f"{adapter.path}: the adapter cannot be applied to this base model "
                                  f"({type(exc).__name__}: {show(str(exc))})") from exc


def _plan_load(adapter: AdapterFile, base_modules: dict[str, nn.Module], reuse_tensors: bool) -> LoadPlan:
    cfg, source = adapter.config, adapter.path / "adapter_model.safetensors"
    plan = LoadPlan(config=cfg)
    # A tensors read_adapter found finite and the plan keeps as they are (same object) are not summed again
    checked = {id(mw.lora_A) for mw in adapter.modules.values()} if adapter.finite_checked else set()
    _check_targets(cfg, base_modules, adapter.path)
    nested: dict[str, dict] = {}  # fused-experts module -> {PEFT nesting depth: weights}
    for name, mw in adapter.modules.items():
        owner = _param_lora(cfg, name, base_modules)
        if owner is not None and mw.lora_A is not None:
            check_target(source, owner, base_modules[owner], base_modules)
            nested.setdefault(owner, {})[strip_base_layers(name)[1]] = mw
    for owner, by_depth in nested.items():
        plan.lora[owner], plan.ranks[owner], plan.scalings[owner] = plan_experts(source, cfg, owner, base_modules[owner], by_depth)
    todo = []  # (name, weights, base layer, rank, scaling): every check passed, in file order
    for name, mw in adapter.modules.items():
        if _param_lora(cfg, name, base_modules) is not None:
            continue
        base = _base_module(source, name, base_modules)
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
        rank = cfg.rank_for(name)  # read_adapter skips this check for target_parameters files (r*E rows)
        _check_shape(source, name, "lora_A", mw.lora_A.shape, (rank, d_in))
        _check_shape(source, name, "lora_B", mw.lora_B.shape, (d_out, rank))
        if mw.lora_B_bias is not None:
            _check_shape(source, name, "lora_B.bias", mw.lora_B_bias.shape, (d_out,))
        if mw.magnitude is not None:
            if is_embedding:
                raise AdapterConfigError(f"{source}: DoRA on the embedding {name!r} is not supported by loramux")
            _check_shape(source, name, "lora_magnitude_vector", mw.magnitude.shape, (d_out,))
        todo.append((name, mw, base, rank, cfg.scaling_for(name)))
    # every B scaled into the layout SlotWeights keeps, modules of one shape together (b_scaling.py); in the
    # B's own memory when the file was read for this load alone and its tensors share no bytes
    scaled, stacks = scaled_transposed([(name, mw.lora_B, scaling) for name, mw, _, _, scaling in todo],
                                       in_place=reuse_tensors and adapter.disjoint)
    covered: set[int] = set()  # ids of the B the plan keeps as scaled_transposed made them (its stacks hold them)
    cpu32 = (torch.float32, torch.device("cpu"))
    for (name, mw, base, rank, scaling), B_t in zip(todo, scaled):
        dtype, device = layout = weight_dtype_device(base)
        to = dict(dtype=dtype, device=device)
        B_scaled = B_t.T  # (d_out, r) as a view of a contiguous (r, d_out)
        bias = None if mw.lora_B_bias is None else (mw.lora_B_bias.float() * scaling).to(**to)
        dora_scale = None
        if mw.magnitude is not None:
            dora_scale = _dora_scale(base, mw.lora_A.to(device), B_scaled.to(device), mw.magnitude.to(device)).to(**to)
        # embeddings look rows up in A: store it (num_embeddings, r)
        A = mw.lora_A.T.contiguous() if isinstance(base, nn.Embedding) else mw.lora_A
        if layout == cpu32 and A.dtype == dtype and A.device == device:  # the common case: no cast, no move
            A, B = A.contiguous(), B_scaled  # (B_scaled is float32 on the CPU already)
        else:
            A, B = A.to(**to).contiguous(), B_scaled.to(**to)
        entry = plan.lora[name] = SlotWeights(A=A, B=B, bias=bias, dora_scale=dora_scale)
        if entry.B is B_scaled:
            covered.add(id(B_scaled))
        plan.ranks[name], plan.scalings[name] = rank, scaling
    _check_scaled(source, plan, cfg, checked | covered, stacks)
    _plan_modules_to_save(adapter, base_modules, plan)
    if not plan.lora and not plan.modules_to_save:
        raise AdapterWeightsError(f"{source}: no tensor of this adapter applies to the base model")
    return plan


def _unwrapped_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` under the names it had before loramux wrapped submodules of it (another
    adapter's LoRA on ``classifier.dense`` shows as ``dense.base_layer.weight``); tensors not copied."""
    return {re.sub(r"(^|\.)base_layer\.", r"\1", key): t for key, t in module.state_dict(keep_vars=True).items()}


def _unwrapped_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` with loramux wrappers inside it (LoRA of other adapters on its submodules,
    e.g. ``classifier.dense``) replaced by copies of the layers they wrap: the copy is this adapter's
    own module and must not carry, nor copy, other adapters' weights."""
    memo: dict[int, object] = {}
    wrappers = [m for m in base.modules() if isinstance(getattr(m, "slots", None), SlotTable) and hasattr(m, "base_layer")]
    for wrapper in reversed(wrappers):  # innermost first, so an outer wrapper's copy finds its inner one
        memo[id(wrapper)] = copy.deepcopy(wrapper.base_layer, memo)
    return copy.deepcopy(base, memo)


def _plan_modules_to_save(adapter: AdapterFile, base_modules: dict[str, nn.Module], plan: LoadPlan) -> None:
    """Group the remaining keys by the ``modules_to_save`` module they belong to and build its copy."""
    source = adapter.path / "adapter_model.safetensors"
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.extra.items():
        owner = _owner(key, base_modules, adapter.config.modules_to_save)
        if owner is None:
            raise _unexpected(source, key, adapter.config)
        states.setdefault(owner, {})[key[len(owner) + 1:]] = tensor
    for owner, state in states.items():
        base = base_modules[owner]
        check_target(source, owner, base, base_modules, kind="modules_to_save")
        if owner in plan.lora:
            raise TargetModuleError(f"{source}: module {owner!r} is both a LoRA target and in modules_to_save of this "
                                    "adapter; PEFT trains one or the other, re-save the adapter with only one")
        module_copy = _unwrapped_copy(base)
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
