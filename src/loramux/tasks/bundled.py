"""The adapters shipped in the package (``src/loramux/adapters/<task>/``) and loading them.

They were trained by ``examples/train_adapters.py`` on the embedded default base model; each
directory is a plain PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) plus a
``TRAINING.md`` that records how it was made.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

ADAPTERS_DIR = Path(__file__).resolve().parent.parent / "adapters"


def bundled_adapters(root: Path | None = None) -> dict[str, Path]:
    """``{name: directory}`` of every adapter under ``root`` (default: the bundled ones), sorted."""
    root = ADAPTERS_DIR if root is None else Path(root)
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}


def load_adapters(model: Any, adapters: dict[str, Path], on_adapter: Callable[[str], None] | None = None) -> None:
    """Load ``{name: directory}`` into a ``MultiLoraModel``; ``on_adapter(name)`` after each (progress bars)."""
    for name, path in adapters.items():
        model.load_adapter(path, adapter_name=name)
        if on_adapter is not None:
            on_adapter(name)


def load_default(base: str | None = None, adapters: dict[str, Path] | None = None) -> tuple[Any, Any]:
    """``(MultiLoraModel, tokenizer)``: the base model (default: the embedded one) with adapters loaded
    (default: the bundled ones)."""
    from loramux.base import load_base
    from loramux.model import MultiLoraModel

    hf_model, tokenizer = load_base(base)
    model = MultiLoraModel(hf_model)
    load_adapters(model, bundled_adapters() if adapters is None else adapters)
    return model, tokenizer
