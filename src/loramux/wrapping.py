"""The base model's wrapped modules: which layer wraps which module, and writing a load's tensors in.

A module is wrapped the first time an adapter targets it (``LoraLayer`` for LoRA targets,
``ModulesToSaveLayer`` for whole-module copies, ``ExpertsLayer`` for fused MoE experts) and stays
wrapped; each wrapper keeps its adapters' tensors by slot (``slots.py``). Names keep their meaning:
``originals`` maps every module name of the base model to the module it had before any wrapping,
which is what loads are checked and planned against. ``MultiLoraModel`` owns one
``ModuleWrappers`` and calls it under its lock.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator

from torch import nn

from loramux.errors import TargetModuleError
from loramux.experts import ExpertsLayer, ExpertsSlot
from loramux.layers import SUPPORTED_TYPES, LoraLayer, ModulesToSaveLayer
from loramux.loading import LoadPlan
from loramux.targets import BaseModules, tower_of


class ModuleWrappers(Mapping):
    """module name -> its wrapper (a read-only mapping), plus the writes that change them."""

    def __init__(self, base_model: nn.Module) -> None:
        self.base_model = base_model
        # original module names -> original modules; wrapping does not change what names mean
        self.originals = BaseModules((n, m) for n, m in base_model.named_modules() if n)
        self._wrappers: dict[str, nn.Module] = {}

    def __getitem__(self, module: str) -> nn.Module:
        return self._wrappers[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._wrappers)

    def __len__(self) -> int:
        return len(self._wrappers)

    # -- writing a load ----------------------------------------------------------------------------
    def check(self, name: str, plan: LoadPlan, holders: Callable[[nn.Module], list[str]]) -> dict[str, type]:
        """The wrapper kind each module of ``plan`` needs; ``TargetModuleError`` if a module is wrapped
        as another kind already (``holders(wrapper)``: the adapters using it, for the message).

        LoRA and modules_to_save on one module nest (the adapter's copy replaces its rows, LoRA of
        other adapters applies to theirs: ``LoraLayer.copies``, or LoRA inside a ModulesToSaveLayer's
        module); only fused MoE experts (ExpertsLayer) cannot also be replaced whole."""
        kinds = {m: self._kind(m, e, m in plan.lora) for m, e in [*plan.lora.items(), *plan.modules_to_save.items()]}
        for module, kind in kinds.items():
            existing = self._wrappers.get(module)
            if existing is not None and type(existing) is not kind:
                role = "LoRA target" if module in plan.lora else "modules_to_save module"
                raise TargetModuleError(
                    f"adapter {name!r}: module {module!r} is a {role} here but a {type(existing).__name__} for the "
                    f"loaded adapter(s) {holders(existing)}; loramux cannot put LoRA on fused MoE experts and "
                    "replace them whole in one model")
        return kinds

    def write(self, slot: int, plan: LoadPlan, kinds: dict[str, type], written: list[str]) -> None:
        """Write ``plan``'s tensors into ``slot`` of each module's wrapper (wrapping modules first where
        needed), appending each module to ``written``. All or nothing: if a write fails part-way (out of
        memory), the slot is cleared everywhere and the wrappers this call created are removed."""
        modules = [*plan.lora, *plan.modules_to_save]
        created = [m for m in modules if m not in self._wrappers]
        try:
            for module, entry in [*plan.lora.items(), *plan.modules_to_save.items()]:
                wrapper = self._wrap(module, kinds[module])
                table = wrapper.copies if module not in plan.lora and isinstance(wrapper, LoraLayer) else wrapper.slots
                table.write(slot, entry)
                written.append(module)
        except BaseException:
            self.clear(slot, modules)
            for module in reversed(created):  # a nested one first
                if self._wrappers.pop(module, None) is not None:
                    self._put_back(module, self.originals[module])
            written.clear()
            raise

    def clear(self, slot: int, modules: list[str]) -> None:
        """Drop ``slot``'s tensors from these modules' wrappers (its weights are released)."""
        for module in modules:
            wrapper = self._wrappers.get(module)
            for table in (getattr(wrapper, "slots", None), getattr(wrapper, "copies", None)):
                if table is not None:
                    table.clear(slot)

    def unwrap_all(self, keep_slot: int | None) -> None:
        """Put every original module back, or ``keep_slot``'s own copy where it has one (fused experts
        get that slot's delta folded in first); the wrappers are forgotten (``merge_and_unload``)."""
        for module, wrapper in self._wrappers.items():
            copies = wrapper.slots if isinstance(wrapper, ModulesToSaveLayer) else getattr(wrapper, "copies", None)
            own_copy = copies.get(keep_slot) if copies is not None and keep_slot is not None else None
            if isinstance(wrapper, ExpertsLayer) and keep_slot is not None:
                wrapper.fold(keep_slot)  # experts are never merged in place (rows route per token): fold now
            self._put_back(module, own_copy if own_copy is not None else wrapper.base_layer)
        self._wrappers.clear()

    # -- helpers ---------------------------------------------------------------------------------
    def _kind(self, module: str, entry: object, lora: bool) -> type:
        if isinstance(entry, ExpertsSlot):
            return ExpertsLayer
        return LoraLayer if lora or isinstance(self.originals[module], SUPPORTED_TYPES) else ModulesToSaveLayer

    def _wrap(self, module: str, kind: type) -> nn.Module:
        wrapper = self._wrappers.get(module)
        if wrapper is None:
            wrapper = kind(self.originals[module])
            wrapper.in_tower = tower_of(module, self.originals) is not None  # routes per image (targets.py)
            self._put_back(module, wrapper)
            self._wrappers[module] = wrapper
        return wrapper

    def _put_back(self, module: str, replacement: nn.Module) -> None:
        """Set ``module`` on its *original* parent, also when that parent is itself wrapped (LoRA on
        classifier.dense inside a modules_to_save classifier): the wrapper calls that original, so
        what is set there is on the path."""
        parent_name, _, child = module.rpartition(".")
        setattr(self.originals[parent_name] if parent_name else self.base_model, child, replacement)
