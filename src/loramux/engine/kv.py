"""The KV cache of the running batch: one row per sequence, left-padded to a common length.

Why left padding: every row's newest token then sits in the same column, so one decode step is a
plain ``(B, 1)`` forward for all rows, whatever their lengths. The 2-D ``mask`` (1 = real token,
0 = padding) goes to the model as ``attention_mask``; positions come from each row's real length,
so a row computes exactly what it would alone (up to float summation order).

``RowsKV`` is a transformers ``Cache`` whose layers keep keys/values in a buffer with spare room
along the sequence axis: a decode step writes one column in place instead of re-concatenating the
whole cache (what ``DynamicLayer`` does every step). Batch changes (a sequence joins, one leaves)
rebuild the buffers once per event:

- ``merge(a, b, order)``: rows of both, right-aligned to the longer length, in ``order``;
- ``select(rows)``: keep some rows and drop the leading columns that are padding in all of them,
  so memory is freed as soon as a sequence finishes.

Shapes: keys/values (B, H, L, D) with B rows, H kv heads, L padded length, D head dim.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


def _room(length: int) -> int:
    """Capacity for ``length`` tokens plus headroom, so growth reallocates rarely (O(log) times)."""
    return length + max(32, length // 4)


class _RowsLayer(DynamicLayer):
    """One layer's keys/values in a (B, H, capacity, D) buffer; ``keys``/``values`` view its filled part."""

    def __init__(self) -> None:
        super().__init__()
        self.buf_k: torch.Tensor | None = None
        self.buf_v: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def set(self, buf_k: torch.Tensor, buf_v: torch.Tensor, length: int) -> None:
        self.buf_k, self.buf_v, self.length = buf_k, buf_v, length
        self.dtype, self.device, self.is_initialized = buf_k.dtype, buf_k.device, True
        self.keys, self.values = buf_k[:, :, :length], buf_v[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: (B, H, T, D) for the T new tokens of every row
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        end = self.length + t
        if self.buf_k is None or end > self.buf_k.shape[-2]:
            b, h, _, d = key_states.shape
            buf_k = key_states.new_empty(b, h, _room(end), d)
            buf_v = value_states.new_empty(b, h, _room(end), d)
            if self.length:
                buf_k[:, :, : self.length] = self.buf_k[:, :, : self.length]
                buf_v[:, :, : self.length] = self.buf_v[:, :, : self.length]
            self.buf_k, self.buf_v = buf_k, buf_v
        self.buf_k[:, :, self.length:end] = key_states  # one column per step while decoding
        self.buf_v[:, :, self.length:end] = value_states
        self.set(self.buf_k, self.buf_v, end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:  # pragma: no cover - HF API completeness
        if self.buf_k is not None:
            self.set(self.buf_k[indices], self.buf_v[indices], self.length)


class RowsKV(Cache):
    """A left-padded batch cache plus its attention mask; see the module docstring.

    ``mask``: (B, L) long, 1 for real tokens; ``lengths``: real tokens per row.
    """

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=_RowsLayer)
        self.mask: torch.Tensor | None = None
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """The padded length L."""
        return self.mask.shape[1] if self.mask is not None else 0

    def nbytes(self) -> int:
        """Bytes held by the buffers (capacity, not only the filled part)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.buf_k, layer.buf_v) if t is not None)

    def extend_mask(self, new_tokens: int, device: torch.device) -> torch.Tensor:
        """Grow the mask by ``new_tokens`` real columns for every row; the attention mask of the next forward.

        mask: (B, L) -> (B, L + new_tokens)
        """
        ones = torch.ones(self.rows, new_tokens, dtype=torch.long, device=device)
        self.mask = ones if self.mask is None else torch.cat([self.mask, ones], dim=1)
        self.lengths = [n + new_tokens for n in self.lengths]
        return self.mask

    def start(self, rows: int) -> None:
        """An empty cache for ``rows`` sequences that will all be fed the same number of tokens."""
        self.lengths = [0] * rows
        self.mask = None


def merge(a: RowsKV | None, b: RowsKV, order: Sequence[int] | None = None) -> RowsKV:
    """Rows of ``a`` then ``b`` (re-ordered by ``order``, indices into that concatenation) in one new cache.

    Each is right-aligned to the longer width (more left padding for the shorter). One copy of
    every key/value, written straight to its final row.
    """
    if a is None or a.rows == 0:
        parts = [b]
    else:
        parts = [a, b]
    width = max(p.width for p in parts)
    total = sum(p.rows for p in parts)
    order_t = None if order is None else list(order)
    dest = list(range(total)) if order_t is None else [0] * total
    if order_t is not None:
        for new_row, old_row in enumerate(order_t):
            dest[old_row] = new_row
    device = b.mask.device
    out = RowsKV()
    out.lengths = [0] * total
    out.mask = torch.zeros(total, width, dtype=torch.long, device=device)
    offset = 0
    row_slices = []
    for p in parts:
        idx = torch.tensor(dest[offset: offset + p.rows], device=device)
        out.mask[idx, width - p.width:] = p.mask
        for i in range(p.rows):
            out.lengths[dest[offset + i]] = p.lengths[i]
        row_slices.append((p, idx))
        offset += p.rows
    for layer_idx in range(len(b.layers)):
        ref = b.layers[layer_idx].buf_k  # (G, H, cap, D)
        _, h, _, d = ref.shape
        buf_k = ref.new_zeros(total, h, _room(width), d)
        buf_v = ref.new_zeros(total, h, _room(width), d)
        for p, idx in row_slices:
            src = p.layers[layer_idx]
            buf_k[idx, :, width - p.width: width] = src.buf_k[:, :, : p.width]
            buf_v[idx, :, width - p.width: width] = src.buf_v[:, :, : p.width]
        layer = _RowsLayer()
        layer.set(buf_k, buf_v, width)
        out.layers.append(layer)
    return out


def select(kv: RowsKV, rows: Sequence[int]) -> RowsKV | None:
    """Only ``rows`` (in that order), without the columns that are padding in all of them; None if empty."""
    if not rows:
        return None
    device = kv.mask.device
    idx = torch.tensor(list(rows), device=device)
    mask = kv.mask.index_select(0, idx)  # (B', L)
    real_cols = mask.any(dim=0).nonzero()
    trim = int(real_cols[0].item()) if real_cols.numel() else 0
    width = kv.width - trim
    out = RowsKV()
    out.mask = mask[:, trim:].contiguous()
    out.lengths = [kv.lengths[r] for r in rows]
    for src in kv.layers:
        _, h, _, d = src.buf_k.shape
        buf_k = src.buf_k.new_empty(len(rows), h, _room(width), d)
        buf_v = src.buf_v.new_empty(len(rows), h, _room(width), d)
        # gather the rows then copy the kept columns into place: (B', H, width, D)
        buf_k[:, :, :width] = src.buf_k[idx, :, trim: kv.width]
        buf_v[:, :, :width] = src.buf_v[idx, :, trim: kv.width]
        layer = _RowsLayer()
        layer.set(buf_k, buf_v, width)
        out.layers.append(layer)
    return out
