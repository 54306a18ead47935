"""Wrappers that put adapters beside a base layer without copying it.

Each wrapper calls the untouched base layer, then asks the current :class:`BatchMapping` (a
context variable set by ``MultiLoraModel.forward``) which slot each row uses. A wrapper holds no
"active adapter": with no mapping, or no adapter of the batch in this layer, it costs one check
more than the plain layer.
"""
from __future__ import annotations

import torch
from torch import nn

from loramux.mapping import BatchMapping, call_rows, current_mapping, image_mapping
from loramux.ops import apply_lora, kernel_call
from loramux.slots import SlotTable

try:  # GPT-2 style layers store the weight as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

SUPPORTED_TYPES = (nn.Linear, nn.Embedding) + ((Conv1D,) if Conv1D else ())
_UNSET = object()  # no cached decode_delta answer yet (None is an answer)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported base layer; (num_embeddings, dim) for embeddings."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def lora_free_forward(device: torch.device) -> bool:
    """The running forward routes its rows but none of them to LoRA weights (all base rows, or the adapter
    merged into the base): every wrapper outside a vision tower then adds nothing but its modules_to_save
    copies (``LoraLayer.decode_delta(..., lora_free=True)``)."""
    mapping = current_mapping()
    return mapping is not None and not mapping.adds_lora(device)


def weight_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device a base layer computes in, without reading ``weight``: an int8 base layer's
    ``weight`` is a dequantized copy of the whole matrix (``quantize.py``), which an adapter load must
    not pay once per module."""
    if getattr(type(module), "compute_dtype_device", None) is not None:  # a class property (quantize.py): the
        return module.compute_dtype_device  # class is asked first, as nn.Module's __getattr__ raises for a miss
    weight = module.weight
    return weight.dtype, weight.device


def delta_weight_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` (d_out, d_in) in the layout of ``module.weight`` (Conv1D and Embedding store it transposed)."""
    if isinstance(module, nn.Embedding) or (Conv1D and isinstance(module, Conv1D)):
        return delta.T
    return delta


class _PassThrough(nn.Module):
    """Attribute reads the wrapper does not answer go to the wrapped layer: the model keeps reading
    ``embed_scale``, ``padding_idx``, ``in_features``, ``num_embeddings`` ... as before wrapping.

    ``in_tower`` (set when wrapping a layer of a vision tower or projector): its batch axis counts
    images, so it routes by the image -> row mapping of the running forward instead of by rows.
    """

    in_tower = False

    def _mapping(self) -> BatchMapping | None:
        mapping = current_mapping()
        if mapping is None or not self.in_tower:
            return mapping
        images = image_mapping(mapping)
        if images is not None:
            return images
        slots = set(mapping.row_slots)
        if len(slots) == 1:  # every row the same adapter: every image too
            return BatchMapping((next(iter(slots)),), mapping.merged)
        raise RuntimeError(
            "loramux: a vision-tower layer ran with rows of different adapters but no image -> row mapping (call the "
            "whole model with input_ids and pixel_values, whose image tokens tell which row each image belongs to)")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)


def embed_scale_of(module: nn.Module) -> torch.Tensor | float | None:
    """The factor a scaled embedding (Gemma 2/3, BART ``scale_embedding``) multiplies its output by;
    PEFT multiplies the LoRA delta by the same scalar, so must we. None when there is none."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    return None


def replace_rows(y: torch.Tensor, x: torch.Tensor, args: tuple, kwargs: dict, copies: SlotTable,
                 mapping: BatchMapping) -> torch.Tensor:
    """Rows of adapters with their own copy of this module (``modules_to_save``) through that copy."""
    mapping = mapping.for_rows(x.shape[0])
    for group in mapping.groups(x.device):
        copy = copies.get(group.slot)
        if copy is None:
            continue
        out = copy(x[group.rows], *args, **kwargs)  # (b_group, ...) through the adapter's own module
        if group.covers_all:
            return out
        y[group.rows] = out
    return y


class LoraLayer(_PassThrough):
    """A base ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` plus per-slot LoRA weights.

    ``copies`` holds whole replacement modules (``modules_to_save``) of adapters that replace this
    layer while others put LoRA on it (``lm_head``): their rows take the copy's output instead.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = SlotTable()
        self.copies = SlotTable()  # entries are nn.Module copies (not registered: they are not base weights)
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
        return self.add_adapters(self.base_layer(x, *args, **kwargs), x, args, kwargs)

    def decode_delta(self, device: torch.device, rows: int, lora_free: bool = False) -> tuple | None:
        """What ``add_adapters`` does to a decode step's output (one token per row, ``rows`` rows) in the running
        forward, for ``decode_layers``' kernel calls: ``()`` when it adds nothing; ``(tokens, starts, ends, A,
        B_t)`` when it is exactly one grouped-LoRA kernel call with these arguments (every group plain LoRA);
        None otherwise (copies, DoRA, biases, embeddings, no kernel: the module call must run).
        ``lora_free``: the caller found ``lora_free_forward(device)`` true for this forward (the same answer as
        the checks below, without them: a decode step asks ~200 wrappers)."""
        if lora_free and not self.in_tower:
            return None if self.copies.count else ()
        mapping = self._mapping()
        if mapping is None:
            return ()
        if self.copies.count:
            return None
        # the answer depends on the mapping's rows and their slots' weights here, fixed while the mapping lives
        # (its slots are pinned; a reload writes a new slot): the engine's decode batch asks it every step
        key = (self.slots, device, rows)
        delta = mapping._decode_deltas.get(key, _UNSET)
        if delta is _UNSET:
            delta = mapping._decode_deltas[key] = self._decode_delta(mapping, device, rows)
        return delta

    def _decode_delta(self, mapping: BatchMapping, device: torch.device, rows: int) -> tuple | None:
        if not self._lora_applies(mapping, device):
            return ()
        if self.is_embedding:
            return None
        mapping = mapping.for_rows(rows)  # what apply_lora routes by
        call = kernel_call(self.slots, mapping, device, 1)
        if call is None or any(g.slot not in call[0] and self.slots.get(g.slot) is not None for g in mapping.groups(device)):
            return None  # a group with weights here that the kernel does not take (DoRA, bias): apply_lora's loop
        return call[1] if call[0] else ()

    def _lora_applies(self, mapping: BatchMapping, device: torch.device) -> bool:
        """Some row of the running forward has LoRA weights here (an adapter merged into the base adds none).
        mapping.groups is cached per call: an all-`__base__` batch skips the LoRA path in one lookup."""
        return bool(self.slots.count and mapping.adds_lora(device))

    def add_adapters(self, y: torch.Tensor, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
        """The base layer's output ``y`` for input ``x`` plus each row's adapter (what ``forward`` returns); for
        callers that computed ``y`` themselves (``decode_layers``: several base matmuls in one kernel call)."""
        kwargs = {} if kwargs is None else kwargs
        mapping = self._mapping()
        if mapping is None:
            return y
        if self._lora_applies(mapping, x.device):
            y = self._embedding_delta(y, x, mapping) if self.is_embedding else apply_lora(y, x, self.slots, mapping, False, self.bias)
        if self.copies.count:
            y = replace_rows(y, x, args, kwargs, self.copies, mapping)
        return y

    def _embedding_delta(self, y: torch.Tensor, x: torch.Tensor, mapping: BatchMapping) -> torch.Tensor:
        """Embedding LoRA, scaled like the base output (``embed_scale``), for ids with or without a batch axis.

        Position ids shared by every row (GPT-2 ``wpe``, BERT ``position_embeddings``: ids (1, T),
        output broadcast over the batch) are expanded to one slice per row of the running forward
        when the rows' adapters differ: ids (1, T) -> (N, T), output (1, T, d) -> (N, T, d).
        Embeddings whose ids are not per row at all (T5 relative buckets) are refused at load time.
        """
        n = call_rows(mapping) if x.dim() >= 1 and x.shape[0] == 1 else x.shape[0]
        if n != x.shape[0]:
            per_row = mapping.for_rows(n)
            slots = set(per_row.row_slots)
            if len(slots) == 1:  # every row the same adapter: the shared slice stays shared
                mapping = BatchMapping((next(iter(slots)),), mapping.merged)
            else:
                x = x.expand(n, *x.shape[1:])                       # (1, T) -> (N, T)
                y = y.expand(n, *y.shape[1:]).clone()               # (1, T, d) -> (N, T, d)
        scale = embed_scale_of(self.base_layer)
        if scale is None:
            return apply_lora(y, x, self.slots, mapping, True, None)
        delta = apply_lora(torch.zeros_like(y), x, self.slots, mapping, True, None)  # (N, T, d), unscaled
        scale = scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale
        return y + delta * scale if y.requires_grad else y.add_(delta * scale)

    def extra_repr(self) -> str:
        return f"slots={self.slots.occupied()}" + (f", copies={self.copies.occupied()}" if self.copies.count else "")


class ModulesToSaveLayer(_PassThrough):
    """A module some adapters replace whole (PEFT ``modules_to_save``, e.g. a classification head).

    Rows of an adapter with its own copy run through that copy; every other row through the base
    module (in which other adapters may have LoRA on submodules, e.g. ``classifier.dense``). Copies
    are selected per row like LoRA weights, so such adapters mix in one batch.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = SlotTable()  # entries are nn.Module copies (not registered: they are not base weights)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        mapping = self._mapping()
        if mapping is None or self.slots.count == 0:
            return y
        return replace_rows(y, x, args, kwargs, self.slots, mapping)

    def extra_repr(self) -> str:
        return f"slots={self.slots.occupied()}"
