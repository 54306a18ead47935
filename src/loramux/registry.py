"""Which adapters exist: name -> directory, registered one by one or found under adapter roots.

Knowing an adapter costs a dictionary entry; nothing is read until it is first used, so 2,000
registered adapters cost nothing more than 2,000 names. Listeners (the resident-adapter cache)
hear when a name is unregistered or re-pointed, so a stale copy is never served.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from loramux.errors import AdapterNotFoundError, UnknownAdapterError

_CONFIG = "adapter_config.json"


def check_name(name: str) -> str:
    """Adapter names come from HTTP clients: refuse anything that could walk out of a root."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or name.startswith(".") or "\x00" in name:
        raise UnknownAdapterError(f"{name!r} is not a valid adapter name (no path separators, not starting with '.')")
    return name


class AdapterRegistry:
    """Known adapters: explicit ``register(name, path)`` entries, then sub-directories of roots.

    Thread-safe. Lookups under a root check ``root/name/adapter_config.json`` on demand, so an
    adapter copied into a root later is found without re-scanning.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._runtime: set[str] = set()  # names registered with runtime=True (the server's HTTP API)
        self._roots: list[Path] = []
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(name)`` when a registered name is re-pointed or unregistered (caches drop it)."""
        self._listeners.append(callback)

    def _changed(self, name: str) -> None:
        for callback in list(self._listeners):
            callback(name)

    def register(self, name: str, path: str | os.PathLike, *, runtime: bool = False) -> None:
        """Know ``name`` as the adapter in ``path`` (not read now; an existing name is re-pointed and
        keeps how it was first registered). ``runtime``: registered while serving (the server's
        ``/v1/load_lora_adapter``), so it may be unloaded the same way (``is_runtime``)."""
        path = Path(path)
        if not (path / _CONFIG).is_file():
            raise AdapterNotFoundError(f"{path / _CONFIG}: missing; register a PEFT adapter directory")
        with self._lock:
            old = self._paths.get(check_name(name))
            self._paths[name] = path
            if runtime and old is None:
                self._runtime.add(name)
        if old is not None and old != path:
            self._changed(name)

    def reload(self, name: str) -> None:
        """The files of ``name`` changed in place: listeners drop the resident copy once it is unused
        (running requests finish on it), so the next use reads the new files."""
        self.path_of(name)  # UnknownAdapterError if it is not known
        self._changed(name)

    def unregister(self, name: str) -> None:
        """Forget ``name``: new requests for it are refused, and a resident copy leaves once unused."""
        with self._lock:
            if self._paths.pop(name, None) is None:
                raise UnknownAdapterError(f"adapter {name!r} is not registered by name")
            self._runtime.discard(name)
        self._changed(name)

    def is_runtime(self, name: str) -> bool:
        """Whether ``name`` was registered with ``runtime=True`` (and is still registered)."""
        with self._lock:
            return name in self._runtime

    def add_root(self, root: str | os.PathLike) -> int:
        """Serve every sub-directory of ``root`` that holds an adapter, under its directory name.

        Returns how many are there now (one ``listdir``; no file is read).
        """
        root = Path(root)
        if not root.is_dir():
            raise AdapterNotFoundError(f"adapter root {str(root)!r} is not a directory")
        with self._lock:
            if root not in self._roots:
                self._roots.append(root)
        return sum(1 for entry in os.scandir(root) if entry.is_dir() and os.path.isfile(os.path.join(entry.path, _CONFIG)))

    def path_of(self, name: str) -> Path:
        """The directory of ``name``; ``UnknownAdapterError`` if neither registered nor under a root."""
        with self._lock:
            if name in self._paths:
                return self._paths[name]
            roots = list(self._roots)
        check_name(name)
        for root in roots:
            if (root / name / _CONFIG).is_file():
                return root / name
        raise UnknownAdapterError(
            f"adapter {name!r} is not known: register it (AdapterRegistry.register) or put it under an adapter root "
            f"({', '.join(map(str, roots)) or 'none configured'})")

    def __contains__(self, name: object) -> bool:
        try:
            self.path_of(name)  # type: ignore[arg-type]
            return True
        except UnknownAdapterError:
            return False

    def names(self) -> list[str]:
        """Every known name (explicit ones first, then roots in order; first wins)."""
        with self._lock:
            names = dict.fromkeys(self._paths)
            roots = list(self._roots)
        for root in roots:
            for entry in sorted(os.scandir(root), key=lambda e: e.name):
                if entry.is_dir() and not entry.name.startswith(".") and os.path.isfile(os.path.join(entry.path, _CONFIG)):
                    names.setdefault(entry.name, None)
        return list(names)

    def __len__(self) -> int:
        return len(self.names())
