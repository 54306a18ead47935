"""``MultiLoraModel``: one transformers model, any number of LoRA adapters, chosen per row per call.

Which adapter a call uses is data: ``adapter_names`` (one per row), else the context default
(``with model.adapter(...)``), else ``set_adapter``'s default. It becomes a :class:`BatchMapping`
once per call, carried by a context variable that every wrapped layer reads; nothing is written on
the modules to route a call, so threads and asyncio tasks share one model safely.

Loads are atomic (``plan_load`` does every check before the model changes) and thread-safe. Each
load is one ``AdapterInfo`` with one pin count (``loads.py``): calls pin the slots they use, holders
pin a load with ``pin``/``unpin``, and a deleted or replaced adapter's weights are released when the
last pin goes.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from loramux import BASE_ADAPTER, dense_kernel
from loramux.adapter import AdapterFile, read_adapter
from loramux.combine import plan_combination
from loramux.errors import (AdapterExistsError, AdapterNamesError, MergedAdapterError,
                            UnknownAdapterError)
from loramux.layers import LoraLayer
from loramux.loading import LoadPlan, check_against_base, plan_load
from loramux.loads import AdapterInfo, LoadTable
from loramux.routing import PreparedRouting, RecentRouting, is_held, resolve_rows
from loramux.wrapping import ModuleWrappers
from loramux.mapping import BatchMapping, record_call_rows, use_mapping
from loramux.merging import merge_layer, unmerge_layer

logger = logging.getLogger(__name__)

_UNSET = object()


class MultiLoraModel(nn.Module):
    """Wrap ``base_model`` (in place, no copy) so adapters can be loaded beside it and mixed per row."""

    accepts_parsed_adapters = True  # load_adapter takes an AdapterFile too (the engine's host-memory tier)

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        # the base model's nn.Linear layers (lm_head included) run decode steps through the streaming
        # GEMM kernel: a class switch, no copy (dense_kernel.py); a no-op where the kernel is unavailable
        dense_kernel.install(base_model)
        self.base_model = base_model
        self._wrappers = ModuleWrappers(base_model)  # module name -> wrapper; .originals: name -> original module
        self._originals = self._wrappers.originals
        self._loads = LoadTable()  # every load, its slot and its pins; guarded by _lock
        self._lock = threading.RLock()
        self._default: str | None = None
        self._context_default: contextvars.ContextVar[Any] = contextvars.ContextVar(f"loramux_default_{id(self)}", default=_UNSET)
        self._merged: str | None = None
        self._recent = RecentRouting()  # the last names call's rows, reused by the next with the same names
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
            return dict(self._loads.current)

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
        read_here = adapter is None  # then its tensors are this load's alone: B is scaled in their own memory
        # shapes and dtypes are checked against this base from the file's header, before its data is read
        adapter = adapter or read_adapter(path, allow_pickle=allow_pickle,
                                          check=functools.partial(check_against_base, base_modules=self._originals))
        plan = plan_load(adapter, self._originals, reuse_tensors=read_here)
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
        return plan_load(read_adapter(path, allow_pickle=allow_pickle, check=check), self._originals, reuse_tensors=True)

    def _check_new_name(self, name: str, replace: bool) -> None:
        if not isinstance(name, str) or not name or name == BASE_ADAPTER:
            raise AdapterNamesError(f"adapter_name {name!r} is not allowed; use a non-empty name other than {BASE_ADAPTER!r}")
        with self._lock:
            if name in self._loads.current and not replace:
                raise AdapterExistsError(f"an adapter named {name!r} is already loaded; pass replace=True to swap it, "
                                         "or delete_adapter() it first")

    def _commit(self, name: str, plan: LoadPlan, *, path: str | None, use_dora: bool, replace: bool) -> AdapterInfo:
        with self._lock:
            self._check_new_name(name, replace)  # again: another thread may have loaded it meanwhile
            if self._merged is not None and use_dora:
                raise MergedAdapterError(f"adapter {self._merged!r} is merged into the base weights; unmerge_adapter() "
                                         f"before loading the DoRA adapter {name!r} (its norms are taken on W0)")
            kinds = self._wrappers.check(name, plan, self._holders)
            slot = self._loads.reserve()
            try:
                self._wrappers.write(slot, plan, kinds, self._loads.modules(slot))
            except BaseException:  # e.g. out of memory part-way: no half-written slot, no new wrapper stays
                self._loads.cancel(slot)
                raise
            info = AdapterInfo(name=name, path=path, slot=slot, ranks=dict(plan.ranks), scalings=dict(plan.scalings),
                               modules_to_save=tuple(plan.modules_to_save), use_dora=use_dora, nbytes=plan.nbytes,
                               config=plan.config)
            if self._merged == name:  # the merged weights are the old load's
                self._unmerge_locked()
            old = self._loads.publish(info)
            if old is not None:
                self._retire(old)
            return info

    def _holders(self, wrapper: nn.Module) -> list[str]:
        """The loaded adapters with tensors in ``wrapper`` (for error messages)."""
        tables = [t for t in (getattr(wrapper, "slots", None), getattr(wrapper, "copies", None)) if t is not None]
        return sorted(n for n, i in self._loads.current.items() if any(t.get(i.slot) is not None for t in tables))

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget ``adapter_name``; its memory is released once no running call uses it."""
        with self._lock:
            info = self._info(adapter_name)
            if self._merged == adapter_name:
                self._unmerge_locked()
            if self._default == adapter_name:
                self._default = None
            self._retire(info)

    def _retire(self, info: AdapterInfo) -> None:
        if self._loads.retire(info):
            self._free(info.slot)

    def _free(self, slot: int) -> None:
        self._recent.forget(slot)
        self._wrappers.clear(slot, self._loads.free(slot))

    def _info(self, name: str) -> AdapterInfo:
        return self._loads.get(name)

    # ------------------------------------------------------------------ holding a load
    def pin(self, adapter: str | AdapterInfo) -> AdapterInfo:
        """Hold an adapter's current load (a name) or a given load until ``unpin``: its weights stay,
        and rows routed to it keep them, even if the name is deleted or replaced meanwhile (requests
        already running finish on the weights they started with). Raises ``UnknownAdapterError``."""
        with self._lock:
            info = self._info(adapter) if isinstance(adapter, str) else adapter
            if not self._loads.holds(info):
                raise UnknownAdapterError(f"the load of adapter {info.name!r} given to pin() was already released; "
                                          "pin the adapter by name for its current load")
            self._loads.pin(info.slot)
            return info

    def unpin(self, info: AdapterInfo) -> None:
        """Release one ``pin``; a retired load's weights are freed with its last pin."""
        with self._lock:
            if not self._loads.holds(info):
                raise UnknownAdapterError(f"the load of adapter {info.name!r} given to unpin() is not held")
            if self._loads.unpin(info.slot):
                self._free(info.slot)

    def pins(self, info: AdapterInfo) -> int:
        """Calls running with ``info``'s load plus its holders (0 once it is released)."""
        with self._lock:
            return self._loads.pins(info)

    def retired_loads(self) -> list[AdapterInfo]:
        """Loads deleted or replaced but still pinned: their weights are still in memory."""
        with self._lock:
            return self._loads.retired()

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

    def prepare_routing(self, rows: Sequence[str | AdapterInfo | None]) -> PreparedRouting:
        """Resolve one entry per row (a name; a load from ``pin``; None or ``"__base__"``: the base model)
        once, for a batch whose rows stay the same over many calls (the engine's decode batch, prepared
        again when a row joins or leaves). Passing the result as ``adapter_names`` skips the lookups in
        every call; when every adapter row is a pinned load, calls do not pin again either."""
        rows = tuple(rows)
        with self._lock:
            mapping, infos = resolve_rows(self._loads, self._merged, rows)
            return PreparedRouting(rows, mapping, infos, is_held(rows), self._merged)

    def _resolve(self, adapter_names: str | Sequence[str | None] | PreparedRouting | None,
                 n_rows: int) -> tuple[BatchMapping | None, tuple[int, ...]]:
        """Rows -> (mapping, the slots pinned for this call: the caller's ``finally`` unpins them).

        A ``PreparedRouting`` is used as it is while it is current (``routing.py``): a held one pins
        nothing more; otherwise its rows are resolved afresh, so it never routes to stale weights.
        """
        if isinstance(adapter_names, PreparedRouting):
            prepared = adapter_names
            if prepared.mapping.n_rows != n_rows:
                raise AdapterNamesError(f"the prepared routing has {prepared.mapping.n_rows} rows but the batch has "
                                        f"{n_rows}; prepare_routing() for this batch")
            with self._lock:
                if prepared.is_current(self._loads, self._merged):
                    return prepared.mapping, () if prepared.held else self._pin_slots(prepared.mapping.slots)
                if prepared.held:  # merged or unmerged since (or a load released: resolve_rows says so)
                    return resolve_rows(self._loads, self._merged, prepared.rows)[0], ()
            adapter_names = list(prepared.rows)
        if adapter_names is None:
            default = self._context_default.get()
            adapter_names = self._default if default is _UNSET else default
            if adapter_names is None and self._merged is None:
                return None, ()
            adapter_names = adapter_names or self._merged
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names] * n_rows
        if not isinstance(adapter_names, (list, tuple)):
            raise AdapterNamesError(f"adapter_names must be a list of names (one per row), got {type(adapter_names).__name__}")
        if len(adapter_names) != n_rows:
            raise AdapterNamesError(f"adapter_names has {len(adapter_names)} entries but the batch has {n_rows} rows; "
                                    "pass one adapter name (or '__base__') per row")
        with self._lock:
            mapping = self._recent.mapping(self._loads, self._merged, adapter_names)
            return mapping, self._pin_slots(mapping.slots)

    def _pin_slots(self, slots: frozenset[int]) -> tuple[int, ...]:
        for slot in slots:
            self._loads.pin(slot)
        return tuple(slots)

    def _release(self, pinned: tuple[int, ...]) -> None:
        if not pinned:
            return
        with self._lock:
            for slot in pinned:
                if self._loads.unpin(slot):
                    self._free(slot)

    @contextlib.contextmanager
    def routing(self, adapter_names: str | Sequence[str | None] | None, n_rows: int) -> Iterator[BatchMapping | None]:
        """Run the block with rows routed to ``adapter_names``; for callers that drive the base model directly."""
        mapping, pinned = self._resolve(adapter_names, n_rows)
        try:
            with use_mapping(mapping):
                yield mapping
        finally:
            self._release(pinned)

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
            for module in self._loads.modules(info.slot):
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
        slot = self._loads.current[self._merged].slot
        for module in self._loads.modules(slot):
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
            self._wrappers.unwrap_all(self._loads.current[self._merged].slot if self._merged else None)
            self._loads.clear()
            self._merged = self._default = None
            # plain nn.Linear, the original norms and SDPA again: the returned model pickles, compiles and is
            # checked like any transformers model (dense_kernel's classes and attention name exist only after install)
            dense_kernel.uninstall(self.base_model)
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
