"""A model's adapter loads: which load each name serves, which slot each load holds, who holds it.

One record per load: ``AdapterInfo`` (immutable; a new one on every load or reload, so its identity
is the load's). One pin count per slot, for everyone who needs the weights to stay: a forward call
pins the slots of its rows for the call, and a holder (the engine, for a request's lifetime) pins a
load with ``MultiLoraModel.pin``. Deleting or replacing a name *retires* its load: no new call can
name it, holders keep using it, and its slot is freed (its weights released) when the last pin
goes. ``MultiLoraModel`` owns one ``LoadTable`` and guards it with its lock.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from loramux.adapter import AdapterConfig
from loramux.errors import UnknownAdapterError


@dataclass(frozen=True, eq=False)
class AdapterInfo:
    """What a loaded adapter is and costs; one object per load (compared by identity).
    ``nbytes`` counts the tensors it added beside the base."""

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


@dataclass
class _Slot:
    info: AdapterInfo | None = None                      # the load in this slot (None while being written)
    modules: list[str] = field(default_factory=list)     # wrapped modules holding its weights
    pins: int = 0                                        # calls running with it + holders
    retired: bool = False                                # deleted or replaced: freed when pins reach 0


class LoadTable:
    """Names -> current loads, slots -> their state. Not thread-safe on its own: the model's lock."""

    def __init__(self) -> None:
        self.current: dict[str, AdapterInfo] = {}
        self._slots: dict[int, _Slot] = {}
        self._free: list[int] = []

    # -- queries ------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterInfo:
        info = self.current.get(name)
        if info is None:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded; loaded: {sorted(self.current) or 'none'}; "
                                      "load it with load_adapter(path, adapter_name=...)")
        return info

    def holds(self, info: AdapterInfo) -> bool:
        """Whether ``info``'s slot still holds that load (live or retired, not freed)."""
        slot = self._slots.get(info.slot)
        return slot is not None and slot.info is info

    def modules(self, slot: int) -> list[str]:
        return self._slots[slot].modules

    def pins(self, info: AdapterInfo) -> int:
        return self._slots[info.slot].pins if self.holds(info) else 0

    def retired(self) -> list[AdapterInfo]:
        """Loads deleted or replaced but still pinned: their weights are still in memory."""
        return [s.info for s in self._slots.values() if s.retired and s.info is not None]

    # -- a load's life ---------------------------------------------------------------------------
    def reserve(self) -> int:
        """A free slot for a load being written (``publish`` or ``cancel`` it)."""
        slot = self._free.pop() if self._free else len(self._slots)
        self._slots[slot] = _Slot()
        return slot

    def cancel(self, slot: int) -> None:
        self._slots[slot] = _Slot()
        self._free.append(slot)

    def publish(self, info: AdapterInfo) -> AdapterInfo | None:
        """``info`` (written into its reserved slot) now serves its name; returns the load it replaced,
        which the caller retires."""
        self._slots[info.slot].info = info
        old = self.current.get(info.name)
        self.current[info.name] = info
        return old

    def retire(self, info: AdapterInfo) -> bool:
        """No new call may use ``info``; True if its slot is unpinned and must be freed now."""
        if self.current.get(info.name) is info:
            del self.current[info.name]
        slot = self._slots[info.slot]
        slot.retired = True
        return slot.pins == 0

    def pin(self, slot: int) -> None:
        self._slots[slot].pins += 1

    def unpin(self, slot: int) -> bool:
        """One pin less; True if the slot is retired, unpinned, and must be freed now."""
        state = self._slots[slot]
        if state.pins <= 0:
            raise RuntimeError(f"slot {slot} ({state.info.name if state.info else 'empty'}) was unpinned more often "
                               "than it was pinned")
        state.pins -= 1
        return state.pins == 0 and state.retired

    def free(self, slot: int) -> list[str]:
        """Forget the load in ``slot``; returns the modules whose tables still hold its weights."""
        modules = self._slots[slot].modules
        self._slots[slot] = _Slot()
        self._free.append(slot)
        return modules

    def clear(self) -> None:
        self.current.clear()
        self._slots.clear()
        self._free.clear()
