"""The KV cache of the running batch: one row per sequence, left-padded to a common length.

Why left padding: every row's newest token then sits in the same column, so one decode step is a
plain ``(B, 1)`` forward for all rows, whatever their lengths. The 2-D ``mask`` (1 = real token,
0 = padding) goes to the model as ``attention_mask``; positions come from each row's real length,
so a row computes what it would alone (up to float summation order). Padding holds zeros, never
garbage: a masked position still meets a multiply, and 0 * NaN would poison the row.

``RowsKV`` is a transformers ``Cache`` whose layers keep keys/values in buffers with spare room
in both directions, so that nothing copies the whole cache in the common cases:

- a decode step writes one column in place (``DynamicLayer`` re-concatenates everything);
- a sequence joins (``add``) by writing its rows into free row slots, right-aligned; if it is
  longer than the batch, the window's start moves left into the spare margin (zeroed);
- a sequence leaves (``remove``) by moving the last row into its slot (one row copied), and the
  window's start moves right past columns that are padding for every remaining row;
- ``permute`` moves a few rows at once, for callers that keep rows grouped by adapter.

Buffers are reallocated (one copy) only when a margin runs out, and shrunk when mostly empty, so
finished sequences give their memory back.

Shapes: buffers (Bcap, H, Lcap, D); the live window is rows [0, B) x columns [start, end), with B
rows, H kv heads, D head dim; ``width = end - start``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


def _room(n: int, minimum: int = 32) -> int:
    """``n`` plus headroom (a quarter, at least ``minimum``): growth reallocates O(log) times."""
    return n + max(minimum, n // 4)


class _RowsLayer(DynamicLayer):
    """One layer's keys/values; ``keys``/``values`` view the live window (what attention reads).

    The views are sliced when read after the window moved, not on every move: a decode step through
    ``decode_stack`` moves every layer's window by a column and reads none of them (two slices a layer,
    ~0.3 ms of a B1 step on this machine's cold interpreter). They are read-only: the buffers are the
    state, written by ``update`` and ``RowsKV``'s row operations."""

    def __init__(self) -> None:
        super().__init__()
        self.buf_k: torch.Tensor | None = None
        self.buf_v: torch.Tensor | None = None
        self.rows = self.start = self.end = 0

    @property
    def keys(self) -> torch.Tensor | None:
        return self._views()[0]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._assigned(tensor)

    @property
    def values(self) -> torch.Tensor | None:
        return self._views()[1]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._assigned(tensor)

    def _views(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        views = self._window  # set (None) by the setters when transformers' base __init__ assigns None
        if views is None:
            if self.buf_k is None:
                return None, None
            views = self._window = (self.buf_k[: self.rows, :, self.start: self.end],   # (B, H, width, D)
                                    self.buf_v[: self.rows, :, self.start: self.end])
        return views

    def _assigned(self, tensor: torch.Tensor | None) -> None:
        """transformers' layer base sets ``keys``/``values`` to None on creation; anything else would bypass the
        buffers (transformers' beam reordering or offloading, which a RowsKV does not support): refused."""
        if tensor is not None:
            raise NotImplementedError("a RowsKV layer keeps its keys and values in its buffers: they change through "
                                      "update() and RowsKV's row operations, not by assignment")
        self._window = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> "_RowsLayer":
        """A layer whose live window is a copy of ``keys``/``values`` (B, H, L, D), with room to grow."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        b, h, length, d = keys.shape
        layer.buf_k = keys.new_empty(b, h, _room(length), d)
        layer.buf_v = values.new_empty(b, h, _room(length), d)
        layer.buf_k[:, :, :length] = keys
        layer.buf_v[:, :, :length] = values
        layer.rows, layer.start, layer.end = b, 0, length
        layer._moved()
        return layer

    def _moved(self) -> None:
        """The live window or the buffers changed: ``keys``/``values`` are sliced anew when next read."""
        self._window = None

    def resize(self, rows_cap: int, cols_cap: int, start: int) -> None:
        """New buffers with the live window copied to columns starting at ``start``."""
        b, h, _, d = self.buf_k.shape
        width = self.end - self.start
        buf_k = self.buf_k.new_empty(rows_cap, h, cols_cap, d)
        buf_v = self.buf_v.new_empty(rows_cap, h, cols_cap, d)
        buf_k[: self.rows, :, start: start + width] = self.buf_k[: self.rows, :, self.start: self.end]
        buf_v[: self.rows, :, start: start + width] = self.buf_v[: self.rows, :, self.start: self.end]
        self.buf_k, self.buf_v, self.start, self.end = buf_k, buf_v, start, start + width
        self._moved()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: (B, H, T, D), the T new tokens of every live row
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        if self.buf_k is None:
            self.buf_k = key_states.new_empty(b, h, _room(t), d)
            self.buf_v = value_states.new_empty(b, h, _room(t), d)
            self.rows = b
        elif self.end + t > self.buf_k.shape[2]:
            self.resize(self.buf_k.shape[0], _room(self.end - self.start + t), 0)
        self.buf_k[: self.rows, :, self.end: self.end + t] = key_states
        self.buf_v[: self.rows, :, self.end: self.end + t] = value_states
        self.end += t
        self._moved()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` columns of the window (negative: drop that many from the right)."""
        width = self.end - self.start
        keep = width + max_length if max_length < 0 else min(max_length, width)
        self.end = self.start + max(0, keep)
        self._moved()


class RowsKV(Cache):
    """A left-padded batch cache plus its attention mask; see the module docstring.

    ``mask``: (B, width) long, 1 for real tokens; ``lengths``: real tokens per row.
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
        return self.mask.shape[1] if self.mask is not None else 0

    def nbytes(self) -> int:
        """Bytes held by the buffers (their capacity, not only the live window)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.buf_k, layer.buf_v) if t is not None)

    @classmethod
    def holding(cls, tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> "RowsKV":
        """One row whose cache is a copy of ``tensors`` (per layer: keys, values (1, H, L, D)), no padding:
        how a prefix-cache hit starts a request's prompt."""
        kv = cls()
        kv.layers = [_RowsLayer.holding(k, v) for k, v in tensors]
        length = tensors[0][0].shape[2]
        kv.lengths = [length]
        kv.mask = torch.ones(1, length, dtype=torch.long, device=tensors[0][0].device)
        return kv

    def window(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the live window, per layer (keys, values) (B, H, width, D): what the prefix cache keeps."""
        return [(layer.keys.clone(), layer.values.clone()) for layer in self.layers]

    def copy(self) -> "RowsKV":
        """An independent copy (forking a prefilled prompt into another sequence)."""
        if self.rows != 1 or self.mask is None or not bool(self.mask.all()):
            raise ValueError("RowsKV.copy() copies a single unpadded row (a prefilled prompt)")
        return RowsKV.holding([(layer.keys, layer.values) for layer in self.layers])  # holding() copies

    def begin(self, rows: int) -> None:
        """An empty cache for ``rows`` sequences that will be fed the same number of tokens."""
        self.lengths, self.mask = [0] * rows, None

    def extend_mask(self, new_tokens: int, device: torch.device) -> torch.Tensor:
        """The attention mask of the next forward, which feeds ``new_tokens`` real tokens to every row.

        mask: (B, width) -> (B, width + new_tokens)
        """
        ones = torch.ones(self.rows, new_tokens, dtype=torch.long, device=device)
        self.mask = ones if self.mask is None else torch.cat([self.mask, ones], dim=1)
        self.lengths = [n + new_tokens for n in self.lengths]
        return self.mask

    def decode_columns(self, rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int] | None:
        """(keys buffer per layer, values buffer per layer, start, end) when every layer holds ``rows`` rows over
        the same window and has room for one more column: what ``decode_stack`` writes in place (column ``end``)
        and attends over (columns ``[start, end]``); then ``advance()``. None otherwise (the layers' own
        ``update`` then grows the buffers)."""
        if not self.layers:
            return None
        first = self.layers[0]
        for layer in self.layers:
            if (type(layer) is not _RowsLayer or layer.buf_k is None or layer.rows != rows or layer.start != first.start
                    or layer.end != first.end or layer.end >= layer.buf_k.shape[2] or layer.end >= layer.buf_v.shape[2]):
                return None
        return [layer.buf_k for layer in self.layers], [layer.buf_v for layer in self.layers], first.start, first.end

    def advance(self) -> None:
        """Every layer's window takes in the column ``decode_stack`` wrote (what ``update`` does after its write)."""
        for layer in self.layers:
            layer.end += 1
            layer._moved()

    @classmethod
    def from_cache(cls, cache: Cache) -> "RowsKV":
        """A copy of an unpadded transformers cache (every layer's ``keys``/``values`` (B, H, L, D)): B rows of L tokens."""
        kv = cls()
        kv.layers = [_RowsLayer.holding(layer.keys, layer.values) for layer in cache.layers]
        rows, length = kv.layers[0].rows, kv.layers[0].end
        kv.lengths = [length] * rows
        kv.mask = torch.ones(rows, length, dtype=torch.long, device=cache.layers[0].keys.device)
        return kv

    def crop(self, max_length: int) -> None:
        """Drop columns from the right (the newest tokens), as ``DynamicCache.crop``: keep ``max_length`` columns,
        or drop ``-max_length`` if negative. Every row loses the same tokens (they are real in every row)."""
        width = self.width
        keep = max(0, width + max_length if max_length < 0 else min(max_length, width))
        for layer in self.layers:
            layer.crop(keep)
        if self.mask is not None:
            self.mask = self.mask[:, :keep]
            self.lengths = [int(n) for n in self.mask.sum(dim=1).tolist()]

    def add(self, other: "RowsKV") -> None:
        """Append the rows of ``other`` (e.g. a freshly prefilled sequence) after the live rows."""
        if self.rows == 0:  # adopt its buffers as they are: no copy
            self.layers, self.mask, self.lengths = other.layers, other.mask, list(other.lengths)
            return
        old, new, width = self.rows, other.rows, max(self.width, other.width)
        grow = width - self.width  # columns the window gains on the left
        for mine, theirs in zip(self.layers, other.layers):
            rows_cap = mine.buf_k.shape[0]
            if old + new > rows_cap or grow > mine.start:
                left = max(grow, 32)  # room for later newcomers' left padding, and _room's headroom on the right
                mine.resize(max(rows_cap, _room(old + new, 4)), left - grow + _room(width), left)
            if grow:
                mine.start -= grow  # the new left columns are padding for the rows already there
                mine.buf_k[:old, :, mine.start: mine.start + grow] = 0
                mine.buf_v[:old, :, mine.start: mine.start + grow] = 0
            pad = width - other.width  # left padding of the newcomers
            rows = slice(old, old + new)
            mine.buf_k[rows, :, mine.start: mine.start + pad] = 0
            mine.buf_v[rows, :, mine.start: mine.start + pad] = 0
            mine.buf_k[rows, :, mine.start + pad: mine.end] = theirs.keys
            mine.buf_v[rows, :, mine.start + pad: mine.end] = theirs.values
            mine.rows = old + new
            mine._moved()
        left = lambda m, n: torch.nn.functional.pad(m, (n, 0)) if n else m  # noqa: E731 - zeros on the left
        self.mask = torch.cat([left(self.mask, grow), left(other.mask, width - other.width)], dim=0)
        self.lengths += other.lengths

    def permute(self, dst: Sequence[int], src: Sequence[int]) -> None:
        """Rows ``dst[i]`` take the old content of rows ``src[i]``, all at once (a cycle is fine).

        One gather and one scatter per buffer, whatever the number of rows moved: what callers that
        keep rows grouped by adapter use to rotate a row into place.
        """
        if not dst:
            return
        d = torch.tensor(list(dst), device=self.mask.device)
        s = torch.tensor(list(src), device=self.mask.device)
        for layer in self.layers:
            window = slice(layer.start, layer.end)
            layer.buf_k[d, :, window] = layer.buf_k[s, :, window]  # the right side is a copy: no overlap issue
            layer.buf_v[d, :, window] = layer.buf_v[s, :, window]
        self.mask[d] = self.mask[s]
        old = list(self.lengths)
        for i, j in zip(dst, src):
            self.lengths[i] = old[j]

    def remove(self, gone: Sequence[int]) -> list[int]:
        """Drop rows ``gone``; returns, for each remaining row position, the old row index now there.

        Each removed row is filled by the current last row (one row copied), then columns that are
        padding for every remaining row are dropped from the window (no copy), and buffers that are
        mostly empty are shrunk (one copy of the live window).
        """
        order = list(range(self.rows))
        for i in sorted(set(gone), reverse=True):
            last = len(order) - 1
            if i != last:
                for layer in self.layers:
                    layer.buf_k[i, :, layer.start: layer.end] = layer.buf_k[last, :, layer.start: layer.end]
                    layer.buf_v[i, :, layer.start: layer.end] = layer.buf_v[last, :, layer.start: layer.end]
                self.mask[i] = self.mask[last]
                self.lengths[i] = self.lengths[last]
                order[i] = order[last]
            order.pop()
            self.lengths.pop()
        rows = len(order)
        self.mask = self.mask[:rows]
        real = self.mask.any(dim=0).nonzero()
        trim = int(real[0].item()) if rows and real.numel() else 0
        self.mask = self.mask[:, trim:]
        for layer in self.layers:
            layer.rows, layer.start = rows, layer.start + trim
            rows_cap, cols_cap = layer.buf_k.shape[0], layer.buf_k.shape[2]
            width = layer.end - layer.start
            if rows and (rows_cap > 2 * rows + 4 or cols_cap > 2 * width + 64):
                layer.resize(_room(rows, 4), _room(width) + 32, 32)
            layer._moved()
        return order
