"""Which adapter slot each batch row uses: built once per forward call, read by every wrapped layer.

The mapping travels in a ``contextvars.ContextVar``, so it is private to the thread or asyncio task
that made the call: two callers on one model never see each other's routing, and no module holds
an "active adapter" attribute.

Shapes: B rows (batch), S slots. ``row_slots[b]`` is a slot id, or ``BASE_SLOT`` (-1) for the plain
base model. Rows that use the same slot form a :class:`Group`; contiguous groups are sliced (a view,
no copy), scattered ones indexed.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch

BASE_SLOT = -1


@dataclass(frozen=True)
class Group:
    """The rows of one slot: ``rows`` is a slice when they are contiguous, else an index tensor."""

    slot: int
    rows: slice | torch.Tensor
    covers_all: bool  # every row of the batch uses this slot: no gather, no scatter


@dataclass(frozen=True)
class BatchMapping:
    row_slots: tuple[int, ...]
    merged: bool = False  # the batch's adapter is merged into W0: LoRA layers add nothing
    _groups: dict = field(default_factory=dict, repr=False, compare=False)     # device -> groups
    _positions: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (B,) positions
    _expanded: dict = field(default_factory=dict, repr=False, compare=False)   # factor -> mapping
    _tokens: dict = field(default_factory=dict, repr=False, compare=False)     # (device, T) -> token ranges
    # SlotTable -> its kernel arguments for these rows (ops._kernel_args). Valid for the mapping's whole
    # life: its slots are pinned while it is used (per call, or by the holder of a prepared routing), and
    # a reload writes a new slot, so the weights of these slots never change under it.
    _kernel_args: dict = field(default_factory=dict, repr=False, compare=False)
    # (SlotTable, device, rows) -> LoraLayer.decode_delta's answer for these rows, valid as long (same reason)
    _decode_deltas: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        return len(self.row_slots)

    def sharing_caches(self) -> "BatchMapping":
        """A new mapping of the same rows with this one's caches (groups, positions, token ranges, kernel
        arguments, decode deltas), for a later call whose rows are the same loads (``routing.RecentRouting``).
        A new object, so the hints tied to one call's mapping (``call_rows``, ``image_mapping``) are not taken
        for the next call's."""
        return BatchMapping(self.row_slots, self.merged, _groups=self._groups, _positions=self._positions,
                            _tokens=self._tokens, _kernel_args=self._kernel_args, _decode_deltas=self._decode_deltas)

    @property
    def slots(self) -> frozenset[int]:
        return frozenset(s for s in self.row_slots if s != BASE_SLOT)

    def groups(self, device: torch.device) -> tuple[Group, ...]:
        """The non-base groups, with index tensors on ``device``; computed once per call and device."""
        cached = self._groups.get(device)
        if cached is None:
            cached = self._groups[device] = tuple(self._build_groups(device))
        return cached

    def adds_lora(self, device: torch.device) -> bool:
        """Some row takes LoRA weights in this forward (an adapter merged into the base adds none)."""
        return not self.merged and bool(self.groups(device))

    @property
    def present(self) -> tuple[int, ...]:
        """Distinct non-base slots, in order of first appearance."""
        return tuple(dict.fromkeys(s for s in self.row_slots if s != BASE_SLOT))

    def positions(self, device: torch.device) -> torch.Tensor:
        """(B,) index of each row's slot in ``present``; base rows point one past the end."""
        cached = self._positions.get(device)
        if cached is None:
            index = {slot: i for i, slot in enumerate(self.present)}
            cached = torch.tensor([index.get(s, len(index)) for s in self.row_slots], dtype=torch.long, device=device)
            self._positions[device] = cached
        return cached

    def token_ranges(self, device: torch.device, tokens_per_row: int) -> tuple[torch.Tensor, tuple[tuple[int, int, int], ...]]:
        """The flat token indices of the non-base groups, for tensors viewed as (B*T, d): ``tokens``
        (n,) int64 on ``device``, group after group, and ``(slot, start, end)`` per group, its tokens
        being ``tokens[start:end]``. Computed once per call, device and T."""
        key = (device, tokens_per_row)
        cached = self._tokens.get(key)
        if cached is None:
            flat: list[int] = []
            ranges = []
            for group in self.groups(torch.device("cpu")):
                rows = range(group.rows.start, group.rows.stop) if isinstance(group.rows, slice) else group.rows.tolist()
                start = len(flat)
                flat.extend(b * tokens_per_row + t for b in rows for t in range(tokens_per_row))
                ranges.append((group.slot, start, len(flat)))
            cached = self._tokens[key] = (torch.tensor(flat, dtype=torch.long, device=device), tuple(ranges))
        return cached

    def _build_groups(self, device: torch.device) -> Iterator[Group]:
        rows_of: dict[int, list[int]] = {}
        for row, slot in enumerate(self.row_slots):
            rows_of.setdefault(slot, []).append(row)
        for slot, rows in rows_of.items():
            if slot == BASE_SLOT:
                continue
            covers_all = len(rows) == self.n_rows
            if rows[-1] - rows[0] + 1 == len(rows):
                yield Group(slot, slice(rows[0], rows[-1] + 1), covers_all)
            else:
                yield Group(slot, torch.tensor(rows, dtype=torch.long, device=device), covers_all)

    def for_rows(self, n_rows: int) -> "BatchMapping":
        """The mapping for a tensor of ``n_rows`` rows: generate() repeats each row k times for beams
        and num_return_sequences (``repeat_interleave``), so row b*k + j belongs to request b."""
        if n_rows == self.n_rows:
            return self
        if n_rows % self.n_rows:
            raise ValueError(
                f"a wrapped layer received {n_rows} rows but adapter_names has {self.n_rows} entries; "
                "loramux routes whole rows (tensors shaped (B, ...)), pass one adapter name per row")
        factor = n_rows // self.n_rows
        expanded = self._expanded.get(factor)
        if expanded is None:
            slots = tuple(s for s in self.row_slots for _ in range(factor))
            expanded = self._expanded[factor] = BatchMapping(slots, self.merged)
        return expanded


_current: contextvars.ContextVar[BatchMapping | None] = contextvars.ContextVar("loramux_batch_mapping", default=None)
# (mapping, rows) of the model forward running now: generate() calls the model once per step with
# B*k rows (beams), and a layer whose input has no batch axis (GPT-2 ``wpe`` gets (1, T) ids) needs
# that k to give one slice per row. Tied to the mapping object, so a hint of an earlier call is ignored.
_call_rows: contextvars.ContextVar[tuple[BatchMapping, int] | None] = contextvars.ContextVar("loramux_call_rows", default=None)

_ROW_KEYS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")
# (mapping, per-image mapping) of the forward running now: a vision tower's batch axis counts images,
# so its wrapped layers route image i by the row whose image tokens it fills (Llava: features are
# scattered into the image tokens in row-major order, every image giving the same number of tokens).
_images: contextvars.ContextVar[tuple[BatchMapping, BatchMapping | None] | None] = contextvars.ContextVar(
    "loramux_image_rows", default=None)


def current_mapping() -> BatchMapping | None:
    """The mapping of the forward call running in this thread/task, or None outside any call."""
    return _current.get()


def record_call_rows(module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the wrapped model: note how many rows this forward call has."""
    mapping = _current.get()
    if mapping is None:
        return
    tensor = next((kwargs[k] for k in _ROW_KEYS if isinstance(kwargs.get(k), torch.Tensor)), None)
    if tensor is None and args and isinstance(args[0], torch.Tensor):
        tensor = args[0]
    if tensor is not None and tensor.dim() > 0:
        _call_rows.set((mapping, int(tensor.shape[0])))
    if isinstance(kwargs.get("pixel_values"), torch.Tensor) and isinstance(kwargs.get("input_ids"), torch.Tensor):
        _images.set((mapping, _image_mapping(mapping, kwargs["input_ids"], kwargs["pixel_values"], getattr(module, "config", None))))


def _image_mapping(mapping: BatchMapping, ids: torch.Tensor, pixels: torch.Tensor, config) -> BatchMapping | None:
    """Slot per image: the row holding that image's tokens; None when images and tokens do not pair up."""
    token = getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    n_images = pixels.shape[0] if pixels.dim() == 4 else 0
    if token is None or n_images == 0 or ids.shape[0] % mapping.n_rows:
        return None
    rows = (ids == token).nonzero()[:, 0]             # (n_tokens,) row of each image token, row-major
    if rows.numel() == 0 or rows.numel() % n_images:
        return None
    rows = rows.view(n_images, -1)                     # (n_images, tokens per image)
    if not bool((rows == rows[:, :1]).all()):          # an image split over two rows: cannot tell
        return None
    per_row = mapping.for_rows(ids.shape[0]).row_slots
    return BatchMapping(tuple(per_row[r] for r in rows[:, 0].tolist()), mapping.merged)


def image_mapping(mapping: BatchMapping) -> BatchMapping | None:
    """The per-image mapping of the running forward (see ``_images``), or None when it is unknown."""
    hint = _images.get()
    if hint is not None and hint[0] is mapping:
        return hint[1]
    return None


def call_rows(mapping: BatchMapping) -> int:
    """Rows of the running model forward (B*k under beam search), else ``mapping.n_rows``."""
    hint = _call_rows.get()
    if hint is not None and hint[0] is mapping and hint[1] % mapping.n_rows == 0:
        return hint[1]
    return mapping.n_rows


@contextlib.contextmanager
def use_mapping(mapping: BatchMapping | None) -> Iterator[None]:
    token = _current.set(mapping)
    try:
        yield
    finally:
        _current.reset(token)
        # the call's hints go with it: left set, they kept its mapping (and the adapter tensors its caches
        # hold) alive after the call, a deleted adapter's weights included
        for hint in (_call_rows, _images):
            held = hint.get()
            if held is not None and held[0] is mapping:
                hint.set(None)
