"""Which adapters exist, which are resident in the model, and loading/evicting them.

``AdapterCache`` is the resident set inside one ``MultiLoraModel``, fed by an ``AdapterRegistry``
(``loramux.registry``: name -> directory, re-exported here). It is bounded by a count
(``max_loaded``) and/or a byte budget (``max_bytes``); loads run on a background thread so a load
never stalls requests whose adapters are already resident; an adapter pinned by a running request
is never evicted; unpinned ones leave in least-recently-used order; an adapter unregistered or
re-pointed in the registry stops being served at once (its running requests finish on its old
weights). On a CUDA model a host-memory tier keeps parsed adapters in RAM between disk and device,
so a re-load after eviction skips the disk and the parsing.

Where each piece of an adapter's state lives: the registry knows its name and files; the cache has
one ``AdapterRecord`` while it is loading or resident (every change of state through ``_move``, the
table ``_TRANSITIONS``: LOADING -> RESIDENT -> gone; a failed load leaves from LOADING); the model
holds its slot, its load (``AdapterInfo``, the record's ``info``) and the load's one pin count
(``MultiLoraModel.pin``/``unpin``, which ``acquire``/``release`` call). A load unregistered or
re-pointed is deleted from the model at once; the model keeps its weights until their last pin
goes, and the cache counts them against its limits until then (``CacheView.retired``). The
engine's scheduler decides *when* to load and *what* may be evicted, with pure functions over
``snapshot()`` (``loramux.engine.policy``); this module does the work (``begin_load``,
``acquire``/``release``, evictions). All methods but the loader's are meant for one thread (the
engine's step loop); the loader thread only touches state under ``_lock``.
"""
from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loramux.errors import AdapterError, AdapterWeightsError, UnknownAdapterError
from loramux.openmp import release_thread_pool
from loramux.registry import AdapterRegistry, check_name  # noqa: F401 - re-exported: the registry feeds the cache
from loramux.st_header import read_header

logger = logging.getLogger(__name__)

_CONFIG = "adapter_config.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def estimate_nbytes(path: Path, element_size: int) -> int:
    """Bytes an adapter will take once loaded, from the safetensors header alone (no tensor read)."""
    try:
        return sum(math.prod(spec.shape) for spec in read_header(path / _WEIGHTS[0]).values()) * element_size
    except AdapterWeightsError:  # a .bin, or an unreadable header: the file size is the best guess
        for name in _WEIGHTS:
            if (path / name).is_file():
                return (path / name).stat().st_size
        return 0


class AdapterState(str, enum.Enum):
    LOADING = "loading"    # being read and written into a model slot on the loader thread
    RESIDENT = "resident"  # in the model and servable; running requests pin its load


# every allowed change of state; None = not in the cache (never loaded, evicted, retired, or its load failed)
_TRANSITIONS: dict[AdapterState | None, frozenset[AdapterState | None]] = {
    None: frozenset({AdapterState.LOADING, AdapterState.RESIDENT}),  # RESIDENT: adopted from the model
    AdapterState.LOADING: frozenset({AdapterState.RESIDENT, None}),
    AdapterState.RESIDENT: frozenset({None}),
}


@dataclass
class AdapterRecord:
    """The cache's record of an adapter while it is loading or resident; its pins are its load's (the model's)."""

    name: str
    state: AdapterState
    nbytes: int  # estimate while loading, the model's figure once loaded
    tick: int = 0  # last use, for LRU
    permanent: bool = False  # loaded before the cache existed and not in the registry: cannot reload
    info: Any = None  # the model's load (AdapterInfo) once RESIDENT
    discard: bool = False  # unregistered or re-pointed while LOADING: deleted from the model when the load ends


@dataclass(frozen=True)
class RecordView:
    name: str
    state: AdapterState
    nbytes: int
    pins: int  # requests and calls holding its load now
    tick: int
    permanent: bool

    @property
    def loaded(self) -> bool:
        return self.state is AdapterState.RESIDENT


@dataclass(frozen=True)
class CacheView:
    """A consistent copy of the cache's records and limits: what the policy functions decide on.
    ``retired``: bytes of each load no longer served but still pinned (it counts against the limits)."""

    records: tuple[RecordView, ...]
    max_loaded: int | None
    max_bytes: int | None
    max_concurrent_loads: int
    retired: tuple[int, ...] = ()

    def get(self, name: str) -> RecordView | None:
        return next((r for r in self.records if r.name == name), None)

    def is_resident(self, name: str | None) -> bool:
        r = self.get(name) if name is not None else None
        return name is None or (r is not None and r.state is AdapterState.RESIDENT)

    @property
    def loads_in_flight(self) -> int:
        return sum(r.state is AdapterState.LOADING for r in self.records)


class AdapterCache:
    """Resident adapters of one model, bounded by count and bytes, loaded in the background.

    ``max_loaded``: at most this many adapters resident or loading (>= 1, or None for no count
    limit). ``max_bytes``: their summed size (estimated from file headers until loaded).
    ``host_bytes``: size of the host-memory tier, used only when the model lives on CUDA.
    ``on_change`` is called from the loader thread whenever a load ends (to wake the engine).
    """

    def __init__(self, model: Any, registry: AdapterRegistry | None = None, *, max_loaded: int | None = 32,
                 max_bytes: int | None = None, host_bytes: int | None = None, max_concurrent_loads: int = 1,
                 on_change: Callable[[], None] | None = None) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded_adapters must be >= 1 (or None for no limit), got {max_loaded}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_adapter_bytes must be > 0 (or None for no limit), got {max_bytes}")
        if max_concurrent_loads < 1:
            raise ValueError(f"max_concurrent_loads must be >= 1, got {max_concurrent_loads}")
        self.model = model
        self.registry = registry if registry is not None else AdapterRegistry()
        self.max_loaded, self.max_bytes, self.max_concurrent_loads = max_loaded, max_bytes, max_concurrent_loads
        self.on_change = on_change
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterRecord] = {}
        self._failures: dict[str, BaseException] = {}
        self._tick = 0
        self._pool = ThreadPoolExecutor(max_concurrent_loads, thread_name_prefix="loramux-load")
        self._element_size = element_size(model)
        device = getattr(model, "device", None)
        self._host: OrderedDict[str, Any] | None = OrderedDict() if getattr(device, "type", "cpu") == "cuda" else None
        self.host_bytes = host_bytes if host_bytes is not None else 4 * (max_bytes or 2**30)
        self.counters = {"loads": 0, "evictions": 0, "hits": 0, "misses": 0, "load_errors": 0, "load_seconds": 0.0,
                         "host_hits": 0}
        for name, info in dict(getattr(model, "adapters", {})).items():  # adopt what the caller loaded already
            permanent = name not in self.registry
            if permanent and info.path is not None and Path(info.path, _CONFIG).is_file():
                self.registry.register(name, info.path)
                permanent = False
            self._entries[name] = AdapterRecord(name, AdapterState.RESIDENT, int(info.nbytes), permanent=permanent,
                                                info=info)
        self.registry.add_listener(self._registry_changed)

    # -- the state machine ----------------------------------------------------------------------
    def _move(self, record: AdapterRecord, to: AdapterState | None) -> None:
        """The one place a record changes state (``_lock`` held); ``None`` removes it."""
        if to not in _TRANSITIONS[record.state]:
            raise RuntimeError(f"adapter {record.name!r}: no transition {record.state.value} -> {to}")
        logger.debug("adapter %s: %s -> %s", record.name, record.state.value, to.value if to else "gone")
        if to is None:
            del self._entries[record.name]
        else:
            record.state = to

    def _touch(self, record: AdapterRecord) -> None:
        self._tick += 1
        record.tick = self._tick

    # -- queries ------------------------------------------------------------------------------
    def snapshot(self) -> CacheView:
        """The records and limits as they are now (what ``loramux.engine.policy`` decides on)."""
        with self._lock:
            records = [(r, r.info) for r in self._entries.values()]
        views = tuple(RecordView(r.name, r.state, r.nbytes, self.model.pins(info) if info is not None else 0, r.tick,
                                 r.permanent) for r, info in records)
        retired = tuple(int(i.nbytes) for i in self.model.retired_loads())
        return CacheView(views, self.max_loaded, self.max_bytes, self.max_concurrent_loads, retired)

    def is_resident(self, name: str | None) -> bool:
        if name is None:
            return True
        with self._lock:
            record = self._entries.get(name)
            return record is not None and record.state is AdapterState.RESIDENT

    def is_loading(self, name: str) -> bool:
        with self._lock:
            record = self._entries.get(name)
            return record is not None and record.state is AdapterState.LOADING

    def pins(self, name: str) -> int:
        """Pins on ``name``'s resident load (0 if it is not resident)."""
        with self._lock:
            record = self._entries.get(name)
            info = record.info if record is not None else None
        return self.model.pins(info) if info is not None else 0

    def resident(self) -> list[str]:
        with self._lock:
            return [n for n, r in self._entries.items() if r.state is AdapterState.RESIDENT]

    def stats(self) -> dict[str, Any]:
        view = self.snapshot()
        loaded = [r for r in view.records if r.loaded]
        with self._lock:
            host = len(self._host or ())
        return {**self.counters, "resident_adapters": len(loaded) + len(view.retired),
                "resident_bytes": sum(r.nbytes for r in loaded) + sum(view.retired),
                "loading": view.loads_in_flight, "pinned": sum(r.pins > 0 for r in loaded) + len(view.retired),
                "host_tier_adapters": host}

    def record(self, hit: bool) -> None:
        self.counters["hits" if hit else "misses"] += 1

    # -- pinning (engine thread) --------------------------------------------------------------
    def acquire(self, name: str) -> Any:
        """Pin ``name``'s resident load for one running request and return it (the model's
        ``AdapterInfo``); None if it is not (or no longer) resident."""
        with self._lock:
            record = self._entries.get(name)
            if record is None or record.state is not AdapterState.RESIDENT:
                return None
            self._touch(record)
            # under the cache's lock (then the model's: always in this order), so a registry change
            # either comes first (no record) or after (this request runs on the load it pinned). By
            # name: the model's current load is the truth, also after a reload behind the cache's back.
            try:
                record.info = self.model.pin(name)
            except UnknownAdapterError:  # deleted from the model behind the cache's back
                self._move(record, None)
                return None
            return record.info

    def release(self, info: Any) -> None:
        """Undo one ``acquire`` (``info``: the load it returned); a retired load's weights leave with
        its last pin (the model frees them)."""
        self.model.unpin(info)
        with self._lock:
            record = self._entries.get(info.name)
            if record is not None and record.info is info:
                self._touch(record)

    def _registry_changed(self, name: str) -> None:
        """``name`` was unregistered or re-pointed: stop serving its load now. The model keeps the
        weights for the requests running on them and frees them with their last pin."""
        with self._lock:
            record = self._entries.get(name)
            if record is None or record.permanent:
                return
            if self._host is not None:  # its host copy is outdated too
                self._host.pop(name, None)
            if record.state is AdapterState.LOADING:
                record.discard = True
                return
            self._move(record, None)
        self._delete_from_model(name)

    # -- loading and eviction (engine thread) -------------------------------------------------
    def take_failures(self) -> dict[str, BaseException]:
        """Loads that failed since the last call (name -> the loader's exception)."""
        with self._lock:
            failures, self._failures = self._failures, {}
            return failures

    def estimate(self, name: str) -> tuple[Path, int]:
        """(directory, bytes once loaded) of a registered adapter, from its file header; raises
        ``UnknownAdapterError`` if it is not registered."""
        path = self.registry.path_of(name)
        return path, estimate_nbytes(path, self._element_size)

    def begin_load(self, name: str, path: Path, need: int, victims: tuple[str, ...] = ()) -> bool:
        """Mechanism: evict ``victims`` (each only if still unpinned) and load ``name`` in the background.
        False if ``name`` is known already or the loader is saturated (the caller's view was old)."""
        with self._lock:
            if name in self._entries or sum(r.state is AdapterState.LOADING for r in self._entries.values()) \
                    >= self.max_concurrent_loads:
                return False
            record = AdapterRecord(name, AdapterState.LOADING, need)
            self._entries[name] = record  # None -> LOADING
        for victim in victims:
            self._evict(victim)
        self._pool.submit(self._load, name, path)
        return True

    def start_load(self, name: str, protected: frozenset[str] = frozenset(), force: bool = False,
                   keep: frozenset[str] = frozenset()) -> str:
        """Policy and mechanism in one call (tests, simple callers): ``policy.load_decision`` on a fresh
        snapshot, then ``begin_load``. Returns the ``LoadStatus`` (``"loading"`` when started now);
        raises ``AdapterError`` if it can never fit, ``UnknownAdapterError`` if it is not registered."""
        from loramux.engine import policy  # the engine package imports this module: no cycle at import time

        path, need = self.estimate(name)
        decision = policy.load_decision(self.snapshot(), name, need, protected, force, keep)
        if decision.status in (policy.LoadStatus.TOO_BIG, policy.LoadStatus.NEVER_FITS):
            raise AdapterError(decision.reason)
        if decision.status is policy.LoadStatus.START:
            return policy.LoadStatus.LOADING if self.begin_load(name, path, need, decision.victims) else policy.LoadStatus.BUSY
        return decision.status

    def _evict(self, name: str) -> bool:
        """Evict ``name`` if it is resident and unpinned; True if it left."""
        with self._lock:
            record = self._entries.get(name)
            if record is None or record.state is not AdapterState.RESIDENT or self.model.pins(record.info) > 0:
                return False
            self._move(record, None)
        self._delete_from_model(name)
        logger.debug("evicted adapter %s", name)
        return True

    def _delete_from_model(self, name: str) -> None:
        try:
            self.model.delete_adapter(name)
        except AdapterError:  # deleted behind our back: it is gone either way
            logger.warning("adapter %s was already deleted from the model", name)
        self.counters["evictions"] += 1

    def evict_unpinned(self) -> int:
        """Evict every unpinned adapter (tests, memory pressure); returns how many left."""
        with self._lock:
            names = [n for n, r in self._entries.items() if r.state is AdapterState.RESIDENT and not r.permanent]
        return sum(self._evict(name) for name in names)

    # -- the loader thread --------------------------------------------------------------------
    def _load(self, name: str, path: Path) -> None:
        start = time.perf_counter()
        try:
            source = self._from_host_tier(name, path)
            info = self.model.load_adapter(source, adapter_name=name, replace=True)
        except BaseException as exc:  # noqa: BLE001 - any loader error fails that adapter's requests only
            logger.warning("loading adapter %s from %s failed: %s", name, path, exc)
            with self._lock:
                record = self._entries.get(name)
                if record is not None:
                    self._move(record, None)  # LOADING -> gone
                self._failures[name] = exc
                self.counters["load_errors"] += 1
        else:
            elapsed = time.perf_counter() - start
            with self._lock:
                record = self._entries[name]
                record.nbytes, record.info = int(info.nbytes), info
                stale = record.discard
                self._move(record, None if stale else AdapterState.RESIDENT)
                self._touch(record)
                self.counters["loads"] += 1
                self.counters["load_seconds"] += elapsed
            logger.debug("loaded adapter %s in %.3f s", name, elapsed)
            if stale:  # unregistered or re-pointed while loading: its files were the old ones
                self._delete_from_model(name)
        # the loader thread's OpenMP pool would be a second one beside the engine thread's, and two
        # pools make every small matmul of the engine pay a wake-up (see loramux/openmp.py)
        release_thread_pool()
        if self.on_change is not None:
            self.on_change()

    def _from_host_tier(self, name: str, path: Path) -> Any:
        """On CUDA: the parsed adapter kept in host RAM (read from disk the first time)."""
        if self._host is None or not _accepts_parsed(self.model):
            return str(path)
        from loramux.adapter import read_adapter

        with self._lock:
            cached = self._host.get(name)
            if cached is not None:
                self._host.move_to_end(name)
                self.counters["host_hits"] += 1
                return cached
        parsed = read_adapter(path)
        with self._lock:
            self._host[name] = parsed
            while len(self._host) > 1 and sum(a.nbytes for a in self._host.values()) > self.host_bytes:
                self._host.popitem(last=False)
        return parsed

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def element_size(model: Any) -> int:
    dtype = getattr(model, "dtype", None)
    return getattr(dtype, "itemsize", 4) or 4


def _accepts_parsed(model: Any) -> bool:
    """Whether ``model.load_adapter`` takes an already-parsed ``AdapterFile`` (the host tier needs it)."""
    return bool(getattr(model, "accepts_parsed_adapters", False))
