"""Per-layer storage of adapter weights, indexed by slot id (one slot per loaded adapter).

A layer keeps a plain list ``entries[slot]``: reading the weights of a slot is one list index, not
a dictionary walk by name. Each entry is prepared at load time so the hot path does no scaling:
``B`` is stored pre-multiplied by the adapter's scaling for that module.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class SlotWeights:
    """One adapter's tensors for one layer, ready for the hot path.

    A: (r, d_in) for linear layers; (num_embeddings, r) for embeddings (already transposed for a lookup)
    B: (d_out, r), scaled by alpha/r (or alpha/sqrt(r))
    bias: (d_out,) scaled lora_B bias, or None
    dora_scale: (d_out,) DoRA's magnitude / ||W0 + s B A|| per output feature, or None
    """

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # B is kept as the transposed view of a contiguous (r, d_out) tensor: the hot paths read B.T
        # row by row (the CPU kernel needs it so; MKL's addmm with it is ~1.3-1.5x faster on decode
        # shapes than with B.T of a row-major B). Same bytes, one copy at load time.
        if self.B.dim() == 2 and not self.B.T.is_contiguous():
            object.__setattr__(self, "B", self.B.T.contiguous().T)

    @cached_property
    def A_t(self) -> torch.Tensor:
        """``A.T`` (d_in, r), a view made once: the hot path needs it in every layer of every call."""
        return self.A.T

    @cached_property
    def B_t(self) -> torch.Tensor:
        """``B.T`` (r, d_out), contiguous (see ``__post_init__``), a view made once."""
        return self.B.T

    @cached_property
    def kernel_ready(self) -> bool:
        """Plain LoRA in float32 on the CPU, A and B.T contiguous: what the compiled kernel takes."""
        return (self.bias is None and self.dora_scale is None and self.A.dtype == torch.float32 and self.A.dim() == 2
                and self.A.device.type == "cpu" and self.A.is_contiguous() and self.B_t.is_contiguous())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.bias, self.dora_scale) if t is not None)


class SlotTable:
    """``entries[slot]`` for one layer; ``None`` where the slot's adapter does not cover this layer."""

    def __init__(self) -> None:
        self.entries: list[object | None] = []
        self.count = 0    # occupied slots: a layer with none skips all routing work

    def get(self, slot: int) -> object | None:
        return self.entries[slot] if 0 <= slot < len(self.entries) else None

    def write(self, slot: int, entry: object) -> None:
        if slot >= len(self.entries):
            self.entries.extend([None] * (slot + 1 - len(self.entries)))
        if self.entries[slot] is None:
            self.count += 1
        self.entries[slot] = entry

    def clear(self, slot: int) -> None:
        if self.get(slot) is not None:
            self.entries[slot] = None
            self.count -= 1

    def occupied(self) -> list[int]:
        return [slot for slot, entry in enumerate(self.entries) if entry is not None]
