"""Wrappers that put adapters beside a base layer without copying it.

Each wrapper calls the untouched base layer, then asks the current :class:`BatchMapping` (a
context variable set by ``MultiLoraModel.forward``) which slot each row uses. A wrapper holds no
"active adapter": with no mapping, or no adapter of the batch in this layer, it costs one check
more than the plain layer.
"""
from __future__ import annotations

import torch
from torch import nn

from loramux.mapping import current_mapping
from loramux.ops import apply_lora
from loramux.slots import SlotTable

try:  # GPT-2 style layers store the weight as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

SUPPORTED_TYPES = (nn.Linear, nn.Embedding) + ((Conv1D,) if Conv1D else ())


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported base layer; (num_embeddings, dim) for embeddings."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def delta_weight_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` (d_out, d_in) in the layout of ``module.weight`` (Conv1D and Embedding store it transposed)."""
    if isinstance(module, nn.Embedding) or (Conv1D and isinstance(module, Conv1D)):
        return delta.T
    return delta


class LoraLayer(nn.Module):
    """A base ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` plus per-slot LoRA weights."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = SlotTable()
        self.is_embedding = isinstance(base_layer, nn.Embedding)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight` (tied embeddings, dtype checks) keeps working
        return self.base_layer.weight

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:  # transformers' tie_weights assigns it
        self.base_layer.weight = value

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        mapping = current_mapping()
        if mapping is None or mapping.merged or self.slots.count == 0:
            return y
        return apply_lora(y, x, self.slots, mapping, self.is_embedding, self.bias)

    def extra_repr(self) -> str:
        return f"slots={self.slots.occupied()}"


class ModulesToSaveLayer(nn.Module):
    """A module some adapters replace whole (PEFT ``modules_to_save``, e.g. a classification head).

    Rows of an adapter with its own copy run through that copy; every other row through the base
    module. Copies are selected per row like LoRA weights, so such adapters mix in one batch.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = SlotTable()  # entries are nn.Module copies (not registered: they are not base weights)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        mapping = current_mapping()
        if mapping is None or self.slots.count == 0:
            return y
        mapping = mapping.for_rows(x.shape[0])
        for group in mapping.groups(x.device):
            copy = self.slots.get(group.slot)
            if copy is None:
                continue
            out = copy(x[group.rows], *args, **kwargs)  # (b_group, ...) through the adapter's own module
            if group.covers_all:
                return out
            y[group.rows] = out
        return y

    def extra_repr(self) -> str:
        return f"slots={self.slots.occupied()}"
