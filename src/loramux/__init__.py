"""loramux: many LoRA adapters on one shared base model, chosen per request, mixed in one batch."""
from loramux.errors import (AdapterConfigError, AdapterError, AdapterExistsError, AdapterNamesError,
                            AdapterNotFoundError, AdapterWeightsError, MergedAdapterError, TargetModuleError,
                            UnknownAdapterError)
from loramux.model import BASE_ADAPTER, AdapterInfo, MultiLoraModel

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER", "AdapterConfigError", "AdapterError", "AdapterExistsError", "AdapterInfo", "AdapterNamesError",
    "AdapterNotFoundError", "AdapterWeightsError", "MergedAdapterError", "MultiLoraModel", "TargetModuleError",
    "UnknownAdapterError", "load_base",
]


def __getattr__(name: str):
    # heavy or optional pieces load on first use, so `import loramux` stays cheap
    if name == "load_base":
        from loramux.base import load_base
        return load_base
    if name in ("Engine", "SamplingParams"):
        from loramux import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'loramux' has no attribute {name!r}")
