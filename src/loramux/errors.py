"""Every error loramux raises about adapters, so callers can catch ``AdapterError`` once.

Each subclass also inherits the builtin a Python user would reach for first (``FileNotFoundError``,
``ValueError``, ``LookupError``), so generic handlers keep working. Messages name the file, module,
field or value at fault and say what to do.
"""
from __future__ import annotations


class AdapterError(Exception):
    """Base class of every adapter-related error raised by loramux."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """The adapter directory, its ``adapter_config.json`` or its weights file does not exist."""


class AdapterConfigError(AdapterError, ValueError):
    """``adapter_config.json`` is unreadable, lacks a field, or asks for math loramux does not do."""


class AdapterWeightsError(AdapterError, ValueError):
    """The weights file is corrupt, holds NaN/inf, or a tensor does not fit the base layer."""


class TargetModuleError(AdapterError, ValueError):
    """The adapter targets a module the base model does not have (or of an unsupported type)."""


class UnknownAdapterError(AdapterError, LookupError):
    """A name that is not a loaded adapter (in ``adapter_names``, ``set_adapter``, ``delete_adapter``...)."""

    def __str__(self) -> str:  # LookupError/KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(AdapterError, ValueError):
    """``load_adapter`` under a name already loaded, without ``replace=True``."""


class AdapterNamesError(AdapterError, ValueError):
    """``adapter_names`` does not fit the batch (length, type)."""


class MergedAdapterError(AdapterError, RuntimeError):
    """A call that the merged state cannot serve (another adapter while one is merged into W0)."""
