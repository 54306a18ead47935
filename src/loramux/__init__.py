"""loramux: many LoRA adapters on one shared base model, chosen per request, mixed in one batch."""
from loramux.errors import (AdapterConfigError, AdapterError, AdapterExistsError, AdapterNamesError,
                            AdapterNotFoundError, AdapterWeightsError, MergedAdapterError, TargetModuleError,
                            UnknownAdapterError)

__version__ = "0.1.0"

BASE_ADAPTER = "__base__"  # the name a row uses for the plain base model (PEFT's convention)

__all__ = [
    "BASE_ADAPTER", "AdapterConfigError", "AdapterError", "AdapterExistsError", "AdapterInfo", "AdapterNamesError",
    "AdapterNotFoundError", "AdapterWeightsError", "Engine", "MergedAdapterError", "MultiLoraModel", "SamplingParams",
    "TargetModuleError", "UnknownAdapterError", "load_base",
]

# torch-backed pieces load on first use, so `import loramux` (and `loramux --help`) stays instant
_LAZY = {"MultiLoraModel": "loramux.model", "AdapterInfo": "loramux.loads", "load_base": "loramux.base",
         "Engine": "loramux.engine", "SamplingParams": "loramux.engine"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loramux' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
