"""Which adapters exist, which are resident in the model, and loading/evicting them.

``AdapterCache`` is the resident set inside one ``MultiLoraModel``, fed by an ``AdapterRegistry``
(``loramux.registry``: name -> directory, re-exported here). It is bounded by a count
(``max_loaded``) and/or a byte budget (``max_bytes``); loads run on a background thread so a load
never stalls requests whose adapters are already resident; an adapter pinned by a running request
(reference count) is never evicted; unpinned ones leave in least-recently-used order; an adapter
unregistered or re-pointed in the registry stops being served and leaves once unused. On a CUDA
model a host-memory tier keeps parsed adapters in RAM between disk and device, so a re-load after
eviction skips the disk and the parsing.

The engine's scheduler decides *when* to load and *what* may be evicted (it knows who waits);
this module does the bookkeeping and the work. All methods but the loader's are meant for one
thread (the engine's step loop); the loader thread only touches state under ``_lock``.
"""
from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loramux.errors import AdapterError
from loramux.openmp import release_thread_pool
from loramux.registry import AdapterRegistry, check_name  # noqa: F401 - re-exported: the registry feeds the cache

logger = logging.getLogger(__name__)

_CONFIG = "adapter_config.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def estimate_nbytes(path: Path, element_size: int) -> int:
    """Bytes an adapter will take once loaded, from the safetensors header alone (no tensor read)."""
    st = path / _WEIGHTS[0]
    try:
        with open(st, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= min(st.stat().st_size - 8, 100_000_000):
                raise ValueError("not a safetensors header")
            header = json.loads(f.read(n))
        numel = 0
        for key, meta in header.items():
            if key != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                numel += count
        return numel * element_size
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        for name in _WEIGHTS:  # a .bin, or an unreadable header: the file size is the best guess
            if (path / name).is_file():
                return (path / name).stat().st_size
        return 0


@dataclass
class _Entry:
    state: str  # "loading" | "resident"
    nbytes: int  # estimate while loading, the model's figure once resident
    pins: int = 0
    tick: int = 0  # last use, for LRU
    permanent: bool = False  # loaded before the cache existed and not in the registry: cannot reload
    stale: bool = False  # unregistered or re-pointed: no new requests; evicted once unpinned


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
        self._entries: dict[str, _Entry] = {}
        self._failures: dict[str, BaseException] = {}
        self._tick = 0
        self._pool = ThreadPoolExecutor(max_concurrent_loads, thread_name_prefix="loramux-load")
        self._element_size = _element_size(model)
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
            self._entries[name] = _Entry("resident", int(info.nbytes), permanent=permanent)
        self.registry.add_listener(self._registry_changed)

    # -- queries ------------------------------------------------------------------------------
    def is_resident(self, name: str | None) -> bool:
        if name is None:
            return True
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.state == "resident" and not entry.stale

    def is_loading(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.state == "loading"

    def pins(self, name: str) -> int:
        with self._lock:
            entry = self._entries.get(name)
            return entry.pins if entry else 0

    def resident(self) -> list[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if e.state == "resident" and not e.stale]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            resident = [e for e in self._entries.values() if e.state == "resident"]
            return {**self.counters, "resident_adapters": len(resident), "resident_bytes": sum(e.nbytes for e in resident),
                    "loading": sum(e.state == "loading" for e in self._entries.values()),
                    "pinned": sum(e.pins > 0 for e in resident), "host_tier_adapters": len(self._host or ())}

    def record(self, hit: bool) -> None:
        self.counters["hits" if hit else "misses"] += 1

    # -- pinning (engine thread) --------------------------------------------------------------
    def acquire(self, name: str | None) -> bool:
        """Pin a resident adapter for one running request; False if it is not (or no longer) resident."""
        if name is None:
            return True
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.state != "resident" or entry.stale:
                return False
            entry.pins += 1
            self._tick += 1
            entry.tick = self._tick
            return True

    def release(self, name: str | None) -> None:
        if name is None:
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.pins == 0:
                return
            entry.pins -= 1
            self._tick += 1
            entry.tick = self._tick
            drop = entry.stale and entry.pins == 0
        if drop:
            self._evict(name)

    def _registry_changed(self, name: str) -> None:
        """``name`` was unregistered or re-pointed: stop serving the resident copy, drop it once unused."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.permanent:
                return
            entry.stale = True
            drop = entry.state == "resident" and entry.pins == 0
        if drop:
            self._evict(name)

    # -- loading and eviction (engine thread) -------------------------------------------------
    def take_failures(self) -> dict[str, BaseException]:
        """Loads that failed since the last call (name -> the loader's exception)."""
        with self._lock:
            failures, self._failures = self._failures, {}
            return failures

    def start_load(self, name: str, protected: frozenset[str] = frozenset(), force: bool = False,
                   keep: frozenset[str] = frozenset()) -> str:
        """Begin loading ``name`` in the background if it fits now, evicting unpinned LRU adapters.

        Adapters in ``protected`` (wanted by waiting requests) are evicted only with ``force``, and
        those in ``keep`` (wanted by requests queued ahead of this load's) never.
        Returns ``"resident"``, ``"loading"`` (started now or before), ``"busy"`` (too many loads in
        flight) or ``"full"`` (no room until pinned adapters are released). Raises ``AdapterError``
        if it can never fit, ``UnknownAdapterError`` if it is not registered.
        """
        path = self.registry.path_of(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                return "stale" if entry.stale else entry.state  # stale: the old copy leaves once unused
            if sum(e.state == "loading" for e in self._entries.values()) >= self.max_concurrent_loads:
                return "busy"
            need = estimate_nbytes(path, self._element_size)
            if self.max_bytes is not None and need > self.max_bytes:
                raise AdapterError(f"adapter {name!r} needs about {need} bytes but max_adapter_bytes is {self.max_bytes}; "
                                   "raise max_adapter_bytes")
            victims = self._victims(need, protected, force, keep)
            if victims is None:
                busy = any(e.pins or e.state == "loading" for e in self._entries.values())
                if not busy and self._victims(need, frozenset(), True) is None:
                    raise AdapterError(
                        f"adapter {name!r} cannot be loaded: the resident adapters that cannot be evicted (loaded "
                        f"outside the registry) fill max_loaded_adapters={self.max_loaded} / max_adapter_bytes={self.max_bytes}")
                return "full"
            self._entries[name] = _Entry("loading", need)
        for victim in victims:
            self._evict(victim)
        self._pool.submit(self._load, name, path)
        return "loading"

    def _victims(self, need: int, protected: frozenset[str], force: bool,
                 keep: frozenset[str] = frozenset()) -> list[str] | None:
        """Unpinned adapters to evict so that one more of ``need`` bytes fits; None if impossible."""
        count = len(self._entries)
        used = sum(e.nbytes for e in self._entries.values())
        candidates = sorted((e.tick, n) for n, e in self._entries.items()
                            if e.state == "resident" and e.pins == 0 and not e.permanent)
        order = [n for _, n in candidates if n not in protected]
        if force:
            order += [n for _, n in candidates if n in protected and n not in keep]
        victims: list[str] = []
        for name in [None, *order]:
            if name is not None:
                victims.append(name)
                count -= 1
                used -= self._entries[name].nbytes
            fits_count = self.max_loaded is None or count + 1 <= self.max_loaded
            fits_bytes = self.max_bytes is None or used + need <= self.max_bytes
            if fits_count and fits_bytes:
                return victims
        return None

    def drain_candidates(self, exclude: frozenset[str] = frozenset()) -> list[str]:
        """Pinned resident adapters, fewest pins then least recently used first: the ones to stop
        admitting new requests for, so that they free their place for a waiting adapter."""
        with self._lock:
            return [n for _, _, n in sorted((e.pins, e.tick, n) for n, e in self._entries.items()
                                            if e.state == "resident" and e.pins > 0 and not e.permanent and n not in exclude)]

    def _evict(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.pins > 0 or entry.state != "resident":
                return
            del self._entries[name]
            if entry.stale and self._host is not None:  # its host copy is outdated too
                self._host.pop(name, None)
        try:
            self.model.delete_adapter(name)
        except AdapterError:  # deleted behind our back: it is gone either way
            logger.warning("adapter %s was already deleted from the model", name)
        self.counters["evictions"] += 1
        logger.debug("evicted adapter %s", name)

    def evict_unpinned(self) -> int:
        """Evict every unpinned adapter (tests, memory pressure); returns how many left."""
        with self._lock:
            names = [n for n, e in self._entries.items() if e.state == "resident" and e.pins == 0 and not e.permanent]
        for name in names:
            self._evict(name)
        return len(names)

    # -- the loader thread --------------------------------------------------------------------
    def _load(self, name: str, path: Path) -> None:
        start = time.perf_counter()
        try:
            source = self._from_host_tier(name, path)
            info = self.model.load_adapter(source, adapter_name=name, replace=True)
        except BaseException as exc:  # noqa: BLE001 - any loader error fails that adapter's requests only
            logger.warning("loading adapter %s from %s failed: %s", name, path, exc)
            with self._lock:
                self._entries.pop(name, None)
                self._failures[name] = exc
                self.counters["load_errors"] += 1
        else:
            elapsed = time.perf_counter() - start
            with self._lock:
                entry = self._entries[name]
                entry.state, entry.nbytes = "resident", int(getattr(info, "nbytes", entry.nbytes))
                self._tick += 1
                entry.tick = self._tick
                self.counters["loads"] += 1
                self.counters["load_seconds"] += elapsed
                stale = entry.stale
            logger.debug("loaded adapter %s in %.3f s", name, elapsed)
            if stale:  # unregistered or re-pointed while loading
                self._evict(name)
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


def _element_size(model: Any) -> int:
    dtype = getattr(model, "dtype", None)
    return getattr(dtype, "itemsize", 4) or 4


def _accepts_parsed(model: Any) -> bool:
    """Whether ``model.load_adapter`` takes an already-parsed ``AdapterFile`` (the host tier needs it)."""
    return bool(getattr(model, "accepts_parsed_adapters", False))
