"""Which base modules can carry per-row adapters, and why the others are refused at load time.

A wrapped layer routes by the first axis of its input: row b of the batch uses ``adapter_names[b]``.
That holds for almost every layer of a text model. It does not hold for

- embeddings whose ids are not per row: T5's ``relative_attention_bias`` looks up (Tq, Tk) buckets
  shared by every row (output (Tq, Tk, heads), permuted into one (1, heads, Tq, Tk) bias). There is
  no per-row slice to give each row its own adapter, and routing by the first axis would route by
  query position. GPT-2 ``wpe`` / BERT ``position_embeddings`` get (1, T) ids broadcast over the
  batch: those are expanded to one slice per row (``LoraLayer._embedding_delta``), so they load.
- embedding subclasses whose ``forward`` computes the ids it looks up (BART's learned positions take
  ``input_ids`` and look up ``arange(T) + 2``): LoRA's lookup would use other ids than the base.
- modules of a vision or audio tower (and the projector after it): their first axis counts images
  or clips, not text rows. For Llava, image i's row is known from the image tokens of ``input_ids``
  (features fill them in row-major order, the same number per image), so its tower and projector
  route per image (``mapping.image_mapping``); other multimodal families are refused.

Each refusal is a :class:`TargetModuleError` naming the module and the reason, raised before the model
changes.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from loramux.errors import TargetModuleError

# module names (a path component) of the non-text parts of multimodal models
_TOWER_PARTS = {"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "multi_modal_projector",
                "mm_projector", "vision_projection", "audio_tower", "audio_encoder", "audio_model", "vision_embed_tokens"}
_NON_TEXT_INPUTS = {"pixel_values", "input_features", "input_values", "pixel_values_videos"}


# families whose image -> row pairing mapping._image_mapping computes exactly
IMAGE_ROUTED_TYPES = {"llava"}


class BaseModules(dict):
    """The base model's modules by name as they were before any wrapping (``ModuleWrappers.originals``),
    with what this file derives from them worked out once: the dict is built at wrap time and never
    changed, and a load asks ``tower_of`` for every key of the file (~600 for a 210-module adapter)."""

    @functools.cached_property
    def towers(self) -> frozenset[str]:
        return _find_towers(self)

    @functools.cached_property
    def image_routed(self) -> bool:
        return _find_image_routed(self)


def _find_towers(base_modules: dict[str, nn.Module]) -> frozenset[str]:
    """Names of the modules that are a vision/audio tower or projector (by name, or by the inputs they take)."""
    return frozenset(name for name, module in base_modules.items()
                     if name.rpartition(".")[2] in _TOWER_PARTS or _main_input_name(module) in _NON_TEXT_INPUTS)


def _find_image_routed(base_modules: dict[str, nn.Module]) -> bool:
    return any(getattr(getattr(m, "config", None), "model_type", None) in IMAGE_ROUTED_TYPES
               for n, m in base_modules.items() if "." not in n)


def image_routed(base_modules: dict[str, nn.Module]) -> bool:
    """Whether the model's images pair with rows through its image tokens (a Llava-family model)."""
    return base_modules.image_routed if isinstance(base_modules, BaseModules) else _find_image_routed(base_modules)


def tower_of(name: str, base_modules: dict[str, nn.Module]) -> str | None:
    """The vision/audio tower or projector ``name`` belongs to (the innermost), or None for the text model."""
    towers = base_modules.towers if isinstance(base_modules, BaseModules) else _find_towers(base_modules)
    if not towers:
        return None
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in towers:
            return prefix
    return None


def _main_input_name(module: nn.Module | None) -> object:
    """``module.main_input_name`` (a transformers model's class attribute), read without nn.Module's
    ``__getattr__``, which raises and catches an AttributeError (~10 us) for every module without it."""
    if module is None:
        return None
    found = module.__dict__.get("main_input_name", getattr(type(module), "main_input_name", None))
    return found if found is None or isinstance(found, str) else getattr(module, "main_input_name", None)


def _embedding_problem(name: str, module: nn.Embedding, base_modules: dict[str, nn.Module]) -> str | None:
    parent = base_modules.get(name.rpartition(".")[0])
    if "relative" in name.rpartition(".")[2] or hasattr(parent, "relative_attention_num_buckets"):
        return ("it looks up relative-position buckets (Tq, Tk) shared by every row of the batch, so its output has no "
                "row axis and one adapter per row cannot be applied (T5-style relative attention bias)")
    forward = type(module).forward
    if forward is not nn.Embedding.forward:
        params = [p for p in inspect.signature(forward).parameters.values() if p.name != "self"]
        scaled = hasattr(module, "embed_scale") and len(params) == 1
        if not scaled:
            return (f"its class {type(module).__name__} overrides forward({', '.join(p.name for p in params)}) and computes "
                    "the ids it looks up itself (e.g. learned positions from input_ids), so LoRA's lookup on the input "
                    "would use other ids than the base layer")
        scale = getattr(module, "embed_scale")
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            return f"its embed_scale has shape {tuple(scale.shape)}; only a scalar scale can be applied to the LoRA delta"
    return None


def check_target(source, name: str, base: nn.Module, base_modules: dict[str, nn.Module], kind: str = "LoRA") -> None:
    """Refuse ``name`` as a per-row adapter target (``kind``: "LoRA" or "modules_to_save") when rows cannot be
    told apart in it; see the module docstring."""
    tower = tower_of(name, base_modules)
    if tower is not None and not image_routed(base_modules):
        raise TargetModuleError(
            f"{source}: {kind} on {name!r} is refused: it is part of {tower!r}, a vision/audio tower or projector whose "
            "batch axis counts images (or clips), not text rows, so loramux cannot tell which row's adapter applies. "
            "Adapters on the language model are supported (and on Llava's tower, routed by image tokens); re-train "
            "without the tower (e.g. target_modules regex limited to the language_model)")
    if kind == "LoRA" and isinstance(base, nn.Embedding):
        problem = _embedding_problem(name, base, base_modules)
        if problem is not None:
            raise TargetModuleError(f"{source}: LoRA on the embedding {name!r} is refused: {problem}")
