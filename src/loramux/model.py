"""``MultiLoraModel``: one transformers model, any number of LoRA adapters, chosen per row per call.

Which adapter a call uses is data: ``adapter_names`` (one per row), else the context default
(``with model.adapter(...)``), else ``set_adapter``'s default. It becomes a :class:`BatchMapping`
once per call, carried by a context variable that every wrapped layer reads; nothing is written on
the modules to route a call, so threads and asyncio tasks share one model safely.

Loads are atomic (``plan_load`` does every check before the model changes) and thread-safe; a
deleted adapter's weights are released when the last in-flight call that uses them returns.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from loramux import BASE_ADAPTER, dense_kernel
from loramux.adapter import AdapterConfig, AdapterFile, read_adapter
from loramux.combine import plan_combination
from loramux.errors import (AdapterConfigError, AdapterExistsError, AdapterNamesError, MergedAdapterError,
                            TargetModuleError, UnknownAdapterError)
from loramux.layers import SUPPORTED_TYPES, LoraLayer, ModulesToSaveLayer
from loramux.loading import LoadPlan, check_against_base, plan_load
from loramux.experts import ExpertsLayer, ExpertsSlot
from loramux.targets import tower_of
from loramux.mapping import BASE_SLOT, BatchMapping, record_call_rows, use_mapping
from loramux.merging import merge_layer, unmerge_layer

logger = logging.getLogger(__name__)

_UNSET = object()


@dataclass(frozen=True)
class AdapterInfo:
    """What a loaded adapter is and costs. ``nbytes`` counts the tensors it added beside the base."""

    name: str
    path: str | None
    slot: int
    ranks: Mapping[str, int]           # module -> rank
    scalings: Mapping[str, float]      # module -> alpha/r (or alpha/sqrt(r))
    modules_to_save: tuple[str, ...]
    use_dora: bool
    nbytes: int
    config: AdapterConfig | None = None  # the parsed adapter_config.json (None for add_weighted_adapter results)

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.ranks)

    @property
    def rank(self) -> int:
        return max(self.ranks.values(), default=0)


@dataclass(frozen=True)
class PreparedRouting:
    """Rows -> slots resolved once by ``MultiLoraModel.prepare_routing``: the row names, the mapping,
    and the loads (``AdapterInfo`` objects) its slots came from, checked on every use."""

    names: tuple[str | None, ...]
    mapping: BatchMapping
    infos: tuple[AdapterInfo, ...]


@dataclass
class _SlotState:
    modules: list[str] = field(default_factory=list)   # wrapped modules holding this slot
    inflight: int = 0                                    # calls running with it
    retired: bool = False                                # deleted/replaced: free when inflight hits 0


class MultiLoraModel(nn.Module):
    """Wrap ``base_model`` (in place, no copy) so adapters can be loaded beside it and mixed per row."""

    accepts_parsed_adapters = True  # load_adapter takes an AdapterFile too (the engine's host-memory tier)

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        # the base model's nn.Linear layers (lm_head included) run decode steps through the streaming
        # GEMM kernel: a class switch, no copy (dense_kernel.py); a no-op where the kernel is unavailable
        dense_kernel.install(base_model)
        self.base_model = base_model
        # original module names -> original modules; wrapping does not change what names mean
        self._originals: dict[str, nn.Module] = {n: m for n, m in base_model.named_modules() if n}
        self._wrappers: dict[str, nn.Module] = {}
        self._infos: dict[str, AdapterInfo] = {}
        self._slot_states: dict[int, _SlotState] = {}
        self._free_slots: list[int] = []
        self._lock = threading.RLock()
        self._default: str | None = None
        self._context_default: contextvars.ContextVar[Any] = contextvars.ContextVar(f"loramux_default_{id(self)}", default=_UNSET)
        self._merged: str | None = None
        # rows of each model forward (B*k in beam search), for layers whose input has no batch axis
        base_model.register_forward_pre_hook(record_call_rows, with_kwargs=True)

    # ------------------------------------------------------------------ attributes users expect
    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return self.base_model.generation_config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    @property
    def adapters(self) -> Mapping[str, AdapterInfo]:
        with self._lock:
            return dict(self._infos)

    @property
    def merged_adapter(self) -> str | None:
        return self._merged

    # ------------------------------------------------------------------ loading
    def load_adapter(self, path: str | Path | AdapterFile, adapter_name: str | None = None, *, replace: bool = False,
                     allow_pickle: bool = False) -> AdapterInfo:
        """Read a PEFT adapter directory and add it under ``adapter_name`` (default: the directory name).

        ``path`` may also be an already parsed :class:`AdapterFile` (``read_adapter``), as a host-memory
        cache tier keeps them. Atomic: every check runs before the model changes. ``replace=True``
        hot-swaps an adapter of the same name; calls already running finish with the old weights.
        """
        adapter = path if isinstance(path, AdapterFile) else None
        path = adapter.path if adapter is not None else path
        name = adapter_name if adapter_name is not None else Path(path).name
        self._check_new_name(name, replace)
        # shapes and dtypes are checked against this base from the file's header, before its data is read
        adapter = adapter or read_adapter(path, allow_pickle=allow_pickle,
                                          check=functools.partial(check_against_base, base_modules=self._originals))
        plan = plan_load(adapter, self._originals)
        info = self._commit(name, plan, path=str(path), use_dora=adapter.config.use_dora, replace=replace)
        logger.info("loaded adapter %r from %s: %d modules, %.1f MB", name, path, len(plan.lora), info.nbytes / 1e6)
        return info

    def check_adapter(self, path: str | Path, allow_pickle: bool = False) -> LoadPlan:
        """Every check ``load_adapter`` runs (``read_adapter`` + ``plan_load`` against this base), nothing kept.

        The server's ``/v1/load_lora_adapter`` answers 200 only after this passed, so an adapter shaped
        for another model is refused at once instead of failing every later request. The returned plan
        is the caller's to drop; no slot, wrapper or name of this model changes.
        """
        check = functools.partial(check_against_base, base_modules=self._originals)  # before any tensor is read
        return plan_load(read_adapter(path, allow_pickle=allow_pickle, check=check), self._originals)

    def _check_new_name(self, name: str, replace: bool) -> None:
        if not isinstance(name, str) or not name or name == BASE_ADAPTER:
            raise AdapterNamesError(f"adapter_name {name!r} is not allowed; use a non-empty name other than {BASE_ADAPTER!r}")
        with self._lock:
            if name in self._infos and not replace:
                raise AdapterExistsError(f"an adapter named {name!r} is already loaded; pass replace=True to swap it, "
                                         "or delete_adapter() it first")

    def _commit(self, name: str, plan: LoadPlan, *, path: str | None, use_dora: bool, replace: bool) -> AdapterInfo:
        with self._lock:
            self._check_new_name(name, replace)  # again: another thread may have loaded it meanwhile
            if self._merged is not None and use_dora:
                raise MergedAdapterError(f"adapter {self._merged!r} is merged into the base weights; unmerge_adapter() "
                                         f"before loading the DoRA adapter {name!r} (its norms are taken on W0)")
            # LoRA and modules_to_save on one module nest: the adapter's copy replaces its rows, LoRA of
            # other adapters applies to theirs (LoraLayer.copies, or LoRA inside a ModulesToSaveLayer's module).
            # Only fused MoE experts (ExpertsLayer) cannot also be replaced whole.
            kinds = {m: self._wrapper_kind(m, e, m in plan.lora) for m, e in [*plan.lora.items(), *plan.modules_to_save.items()]}
            for module, kind in kinds.items():
                existing = self._wrappers.get(module)
                if existing is not None and type(existing) is not kind:
                    holders = sorted(n for n, i in self._infos.items() if existing.slots.get(i.slot) is not None
                                     or getattr(existing, "copies", None) is not None and existing.copies.get(i.slot) is not None)
                    raise TargetModuleError(
                        f"adapter {name!r}: module {module!r} is a {'LoRA target' if module in plan.lora else 'modules_to_save module'} "
                        f"here but a {type(existing).__name__} for the loaded adapter(s) {holders}; loramux cannot put LoRA on "
                        "fused MoE experts and replace them whole in one model")
            slot = self._free_slots.pop() if self._free_slots else len(self._slot_states)
            state = self._slot_states[slot] = _SlotState()
            created = [m for m in [*plan.lora, *plan.modules_to_save] if m not in self._wrappers]
            try:
                for module, entry in [*plan.lora.items(), *plan.modules_to_save.items()]:
                    wrapper = self._wrap(module, kinds[module])
                    table = wrapper.copies if module not in plan.lora and isinstance(wrapper, LoraLayer) else wrapper.slots
                    table.write(slot, entry)
                    state.modules.append(module)
            except BaseException:  # e.g. out of memory part-way: no half-written slot, no new wrapper stays
                self._rollback(slot, [*plan.lora, *plan.modules_to_save], created)
                raise
            old = self._infos.get(name)
            info = AdapterInfo(name=name, path=path, slot=slot, ranks=dict(plan.ranks), scalings=dict(plan.scalings),
                               modules_to_save=tuple(plan.modules_to_save), use_dora=use_dora, nbytes=plan.nbytes,
                               config=plan.config)
            self._infos[name] = info
            if old is not None:
                if self._merged == name:
                    self._unmerge_locked()
                self._retire(old.slot)
            return info

    def _rollback(self, slot: int, modules: list[str], created: list[str]) -> None:
        """Undo a commit that failed part-way: clear ``slot`` everywhere it may be written, unwrap the
        wrappers this commit created (in reverse: a nested one first), and free the slot."""
        for module in modules:
            wrapper = self._wrappers.get(module)
            for table in (getattr(wrapper, "slots", None), getattr(wrapper, "copies", None)):
                if table is not None:
                    table.clear(slot)
        for module in reversed(created):
            if self._wrappers.pop(module, None) is not None:
                parent_name, _, child = module.rpartition(".")
                setattr(self._originals[parent_name] if parent_name else self.base_model, child, self._originals[module])
        self._slot_states[slot].modules.clear()
        self._free_slots.append(slot)

    def _wrapper_kind(self, module: str, entry: object, lora: bool) -> type:
        if isinstance(entry, ExpertsSlot):
            return ExpertsLayer
        return LoraLayer if lora or isinstance(self._originals[module], SUPPORTED_TYPES) else ModulesToSaveLayer

    def _wrap(self, module_name: str, kind: type) -> nn.Module:
        wrapper = self._wrappers.get(module_name)
        if wrapper is None:
            parent_name, _, child = module_name.rpartition(".")
            # the original parent, also when it is itself wrapped (LoRA on classifier.dense inside a
            # modules_to_save classifier): the wrapper calls that original, so the LoRA is on the path
            parent = self._originals[parent_name] if parent_name else self.base_model
            wrapper = kind(self._originals[module_name])
            wrapper.in_tower = tower_of(module_name, self._originals) is not None  # routes per image (targets.py)
            setattr(parent, child, wrapper)
            self._wrappers[module_name] = wrapper
        return wrapper

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget ``adapter_name``; its memory is released once no running call uses it."""
        with self._lock:
            info = self._info(adapter_name)
            if self._merged == adapter_name:
                self._unmerge_locked()
            if self._default == adapter_name:
                self._default = None
            del self._infos[adapter_name]
            self._retire(info.slot)

    def _retire(self, slot: int) -> None:
        state = self._slot_states[slot]
        state.retired = True
        if state.inflight == 0:
            self._free(slot)

    def _free(self, slot: int) -> None:
        state = self._slot_states[slot]
        for module in state.modules:
            wrapper = self._wrappers[module]
            wrapper.slots.clear(slot)
            if isinstance(wrapper, LoraLayer):
                wrapper.copies.clear(slot)
        state.modules.clear()
        state.retired = False
        self._free_slots.append(slot)

    def _info(self, name: str) -> AdapterInfo:
        info = self._infos.get(name)
        if info is None:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded; loaded: {sorted(self._infos) or 'none'}; "
                                      "load it with load_adapter(path, adapter_name=...)")
        return info

    # ------------------------------------------------------------------ choosing adapters
    def set_adapter(self, adapter_name: str | None) -> None:
        """Default adapter for calls that name none (``None`` or ``"__base__"``: the base model). O(1)."""
        with self._lock:
            if adapter_name not in (None, BASE_ADAPTER):
                self._info(adapter_name)
            self._default = None if adapter_name == BASE_ADAPTER else adapter_name

    @contextlib.contextmanager
    def adapter(self, adapter_name: str | None) -> Iterator[None]:
        """Default adapter inside this block, for this thread / asyncio task only."""
        if adapter_name not in (None, BASE_ADAPTER):
            with self._lock:
                self._info(adapter_name)
        token = self._context_default.set(adapter_name)
        try:
            yield
        finally:
            self._context_default.reset(token)

    def prepare_routing(self, adapter_names: Sequence[str | None]) -> "PreparedRouting":
        """Resolve one name per row (None or ``"__base__"``: the base model) once, for a batch whose
        rows stay the same over many calls (the engine's decode batch, re-prepared on join/leave).
        Passing the result as ``adapter_names`` then skips the name lookups in every call."""
        names = tuple(adapter_names)
        with self._lock:
            slots = self._slots_locked(names)
            used = set(slots)
            infos = tuple(i for i in self._infos.values() if i.slot in used)
            return PreparedRouting(names, BatchMapping(slots, merged=self._merged is not None), infos)

    def _slots_locked(self, adapter_names: Sequence[str | None]) -> tuple[int, ...]:
        slots = tuple(BASE_SLOT if n in (None, BASE_ADAPTER) else self._info(n).slot for n in adapter_names)
        if self._merged is not None:
            merged_slot = self._infos[self._merged].slot
            wrong = sorted({str(n) for n, s in zip(adapter_names, slots) if s != merged_slot})
            if wrong:
                raise MergedAdapterError(f"adapter {self._merged!r} is merged into the base weights, so rows cannot use "
                                         f"{wrong}; call unmerge_adapter() first")
        return slots

    def _resolve(self, adapter_names: str | Sequence[str | None] | "PreparedRouting" | None,
                 n_rows: int) -> BatchMapping | None:
        """Names -> slots, under the lock, and pin the slots until ``_release`` (the caller's finally).

        A ``PreparedRouting`` is used as it is while the loads it was prepared from are still the
        loaded ones (identity of their ``AdapterInfo``) and the merge state is unchanged; otherwise
        its names are resolved afresh, so a stale preparation can never route to the wrong weights.
        """
        if isinstance(adapter_names, PreparedRouting):
            prepared = adapter_names
            if prepared.mapping.n_rows != n_rows:
                raise AdapterNamesError(f"the prepared routing has {prepared.mapping.n_rows} rows but the batch has "
                                        f"{n_rows}; prepare_routing() for this batch")
            with self._lock:
                if prepared.mapping.merged == (self._merged is not None) and all(
                        self._infos.get(i.name) is i for i in prepared.infos):
                    for slot in prepared.mapping.slots:
                        self._slot_states[slot].inflight += 1
                    return prepared.mapping
            adapter_names = list(prepared.names)
        if adapter_names is None:
            default = self._context_default.get()
            adapter_names = self._default if default is _UNSET else default
            if adapter_names is None and self._merged is None:
                return None
            adapter_names = adapter_names or self._merged
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names] * n_rows
        if not isinstance(adapter_names, (list, tuple)):
            raise AdapterNamesError(f"adapter_names must be a list of names (one per row), got {type(adapter_names).__name__}")
        if len(adapter_names) != n_rows:
            raise AdapterNamesError(f"adapter_names has {len(adapter_names)} entries but the batch has {n_rows} rows; "
                                    "pass one adapter name (or '__base__') per row")
        with self._lock:
            slots = self._slots_locked(adapter_names)
            for slot in set(slots) - {BASE_SLOT}:
                self._slot_states[slot].inflight += 1
        return BatchMapping(slots, merged=self._merged is not None)

    def _release(self, mapping: BatchMapping | None) -> None:
        if mapping is None:
            return
        with self._lock:
            for slot in mapping.slots:
                state = self._slot_states[slot]
                state.inflight -= 1
                if state.inflight == 0 and state.retired:
                    self._free(slot)

    @contextlib.contextmanager
    def routing(self, adapter_names: str | Sequence[str | None] | None, n_rows: int) -> Iterator[BatchMapping | None]:
        """Run the block with rows routed to ``adapter_names``; for callers that drive the base model directly."""
        mapping = self._resolve(adapter_names, n_rows)
        try:
            with use_mapping(mapping):
                yield mapping
        finally:
            self._release(mapping)

    # ------------------------------------------------------------------ running
    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> int:
        for key in ("input_ids", "inputs_embeds", "pixel_values"):
            if kwargs.get(key) is not None:
                return kwargs[key].shape[0]
        if args and isinstance(args[0], torch.Tensor):
            return args[0].shape[0]
        raise AdapterNamesError("cannot tell the batch size: pass input_ids or inputs_embeds")

    def forward(self, *args, adapter_names: str | Sequence[str | None] | None = None, **kwargs):
        with self.routing(adapter_names, self._batch_size(args, kwargs)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: str | Sequence[str | None] | None = None, **kwargs):
        """transformers ``generate`` with rows routed by ``adapter_names`` (beams follow their row)."""
        with self.routing(adapter_names, self._batch_size(args, kwargs)):
            # generate encodes images before its first forward: note the image -> row pairing now
            record_call_rows(self.base_model, args, kwargs)
            return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_name: str | None = None) -> None:
        """Fold ``adapter_name`` (default: the default adapter) into W0. Idempotent for the same name."""
        with self._lock:
            name = adapter_name or self._default
            info = self._info(name) if name else None
            if info is None:
                raise UnknownAdapterError("merge_adapter() needs an adapter name (no default adapter is set)")
            if self._merged == name:
                return
            if self._merged is not None:
                raise MergedAdapterError(f"adapter {self._merged!r} is already merged; unmerge_adapter() before merging {name!r}")
            for module in self._slot_states[info.slot].modules:
                wrapper = self._wrappers[module]
                if isinstance(wrapper, LoraLayer) and wrapper.slots.get(info.slot) is not None:
                    merge_layer(wrapper, wrapper.slots.get(info.slot))
            self._merged = name

    def unmerge_adapter(self) -> None:
        """Restore W0 (to fp32 rounding). A no-op when nothing is merged."""
        with self._lock:
            self._unmerge_locked()

    def _unmerge_locked(self) -> None:
        if self._merged is None:
            return
        slot = self._infos[self._merged].slot
        for module in self._slot_states[slot].modules:
            wrapper = self._wrappers[module]
            if isinstance(wrapper, LoraLayer) and wrapper.slots.get(slot) is not None:
                unmerge_layer(wrapper, wrapper.slots.get(slot))
        self._merged = None

    def merge_and_unload(self, adapter_name: str | None = None) -> nn.Module:
        """A plain transformers model with ``adapter_name`` folded in (or none); this wrapper is emptied."""
        with self._lock:
            if adapter_name is not None and self._merged != adapter_name:
                self.unmerge_adapter()
                self.merge_adapter(adapter_name)
            slot = self._infos[self._merged].slot if self._merged else None
            for module, wrapper in self._wrappers.items():
                parent_name, _, child = module.rpartition(".")
                parent = self._originals[parent_name] if parent_name else self.base_model
                copies = wrapper.slots if isinstance(wrapper, ModulesToSaveLayer) else getattr(wrapper, "copies", None)
                own_copy = copies.get(slot) if copies is not None and slot is not None else None
                if isinstance(wrapper, ExpertsLayer) and slot is not None:
                    wrapper.fold(slot)  # experts are never merged in place (rows route per token): fold now
                setattr(parent, child, own_copy if own_copy is not None else wrapper.base_layer)
            self._wrappers.clear()
            self._infos.clear()
            self._slot_states.clear()
            self._free_slots.clear()
            self._merged = self._default = None
            return self.base_model

    # ------------------------------------------------------------------ combining, reporting
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total", *, generator: torch.Generator | None = None) -> AdapterInfo:
        """A new adapter from loaded ones, with PEFT's recipes and arguments (cat, linear, svd, ties, dare_*,
        magnitude_prune and their *_svd forms; see combine.py). DARE draws its masks from ``generator``, or
        like PEFT from torch's global generator: the same ``torch.manual_seed`` gives PEFT's adapter."""
        if len(adapters) != len(weights) or not adapters:
            raise AdapterNamesError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
        self._check_new_name(adapter_name, replace=False)
        with self._lock:
            infos = [self._info(a) for a in adapters]
            plan = plan_combination(infos, list(weights), self._wrappers, self._originals, combination_type, svd_rank,
                                    density, majority_sign_method, generator, svd_clamp, svd_full_matrices, svd_driver)
        return self._commit(adapter_name, plan, path=None, use_dora=False, replace=False)

    def memory_report(self) -> dict[str, Any]:
        """Bytes of the shared base, of each adapter, and what one full fine-tuned copy per adapter would take."""
        # parameters and buffers (an int8 base keeps its weights and scales as buffers), each storage once
        # (tied embeddings, an int8 embedding sharing the int8 lm_head rows)
        tensors = [*self.base_model.parameters(), *self.base_model.buffers()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
        base = sum(storages.values())
        adapters = {name: info.nbytes for name, info in self.adapters.items()}
        total = base + sum(adapters.values())
        full = base * max(len(adapters), 1)
        return {"base_bytes": base, "adapters": adapters, "total_bytes": total, "full_copies_bytes": full,
                "saving_ratio": full / total if total else 1.0}
