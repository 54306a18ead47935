"""What ``model`` names the server knows, and runtime load/unload, on top of the engine's registry.

The registry (``loramux.registry.AdapterRegistry``) is the single source of truth: a name is served
if and only if the registry knows it (registered, or a sub-directory of an adapter root), and it
remembers which names came through the HTTP API (``is_runtime``: only those can be unloaded). This
module adds only what HTTP needs: model cards for ``/v1/models``, and runtime loading that validates
the adapter *before* announcing it, so a corrupt file is a 400 on ``/v1/load_lora_adapter`` instead
of a failure on some later completion.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from .config import ServerConfig
from .errors import APIError

logger = logging.getLogger(__name__)


class Catalog:
    def __init__(self, engine: Any, config: ServerConfig, registry: Any = None) -> None:
        self.engine = engine
        self.config = config
        self.registry = registry if registry is not None else getattr(engine, "registry", None)
        if self.registry is None:
            raise ValueError("the engine exposes no adapter registry; pass registry= to create_app")
        self.created = int(time.time())
        self._lock = threading.Lock()  # serialises runtime load/unload against each other

    # -- queries --------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return [name for name in self.registry.names() if name != self.config.base_name]

    def has(self, name: str) -> bool:
        """Served names are the registry's: an unloaded adapter is not served any more, even while
        requests that started on it still run on its weights."""
        if name == self.config.base_name:
            return False
        try:
            return name in self.registry
        except Exception:  # an invalid name (slashes, dots) is simply not an adapter
            return False

    def model_ids(self) -> list[str]:
        return [self.config.base_name, *self.adapter_names()]

    def path_of(self, name: str) -> str | None:
        try:
            return str(self.registry.path_of(name))
        except Exception:  # unregistered between names() and here
            return None

    def model_cards(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries as vLLM writes them: adapters name the base as ``parent``."""
        base = self.config.base_name
        cards = [_card(base, self.config.base_path or base, None, self.created)]
        cards += [_card(name, self.path_of(name), base, self.created) for name in self.adapter_names()]
        return cards

    # -- runtime loading --------------------------------------------------------------------------
    async def load(self, name: str, real_path: str, inplace: bool = False) -> None:
        """Validate the adapter at ``real_path`` fully (off the event loop), then register it.

        ``inplace`` re-points an existing name (vLLM's ``load_inplace``): requests already running
        keep the old weights (their pins hold the old copy), later ones get the new ones.
        """
        await asyncio.to_thread(self._load, name, real_path, inplace)

    def _load(self, name: str, real_path: str, inplace: bool = False) -> None:
        with self._lock:
            exists = self.has(name)
            if exists and not inplace:
                raise APIError(400, f"adapter {name!r} is already loaded; unload it first, pass load_inplace: true "
                               "to swap its weights, or choose another name", param="lora_name", code="adapter_exists")
            self._validate(real_path)
            try:
                same_path = exists and self.path_of(name) == real_path
                self.registry.register(name, real_path, runtime=not exists)
                if same_path:  # same directory, new files: the resident copy is stale all the same
                    self.registry.reload(name)
            except Exception as exc:
                raise APIError(400, f"cannot register adapter {name!r}: {exc}", param="lora_name",
                               code="invalid_adapter") from None
            logger.info("runtime-%s adapter %s from %s", "reloaded" if exists else "loaded", name, real_path)

    def _validate(self, real_path: str) -> None:
        """What the engine's first use would check: the files, and (with a real model) the shapes
        against the base (``MultiLoraModel.check_adapter``), keeping nothing resident."""
        from ..adapter import read_adapter  # lazy: torch
        from ..errors import AdapterError, AdapterNotFoundError

        allow_pickle = getattr(self.config, "allow_pickle", False)
        model = getattr(self.engine, "model", None)
        try:
            if hasattr(model, "check_adapter"):
                model.check_adapter(real_path, allow_pickle=allow_pickle)
            else:
                read_adapter(real_path, allow_pickle=allow_pickle)
        except AdapterNotFoundError as exc:
            raise APIError(404, f"no adapter at {real_path!r}: {exc}", param="lora_path",
                           code="adapter_not_found") from None
        except AdapterError as exc:
            raise APIError(400, f"invalid adapter at {real_path!r}: {exc}", param="lora_path",
                           code="invalid_adapter") from None
        except (OSError, ValueError, RuntimeError) as exc:
            raise APIError(400, f"cannot read adapter at {real_path!r}: {type(exc).__name__}: {exc}", param="lora_path",
                           code="invalid_adapter") from None

    async def unload(self, name: str) -> None:
        """Forget a runtime-loaded adapter; requests already running with it finish normally."""
        with self._lock:
            if not self.has(name):
                raise APIError(404, f"adapter {name!r} is not loaded; loaded: {', '.join(self.adapter_names()) or 'none'}",
                               param="lora_name", code="model_not_found")
            if not self.registry.is_runtime(name):
                raise APIError(400, f"adapter {name!r} was not loaded at runtime (it comes from --adapter or an "
                               "adapter root); restart the server without it to stop serving it",
                               param="lora_name", code="not_runtime_loaded")
            self.registry.unregister(name)
            logger.info("runtime-unloaded adapter %s", name)


def _card(model_id: str, root: str | None, parent: str | None, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loramux",
            "root": root, "parent": parent, "permission": []}
