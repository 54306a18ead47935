"""The LoRA delta for a batch whose rows use different adapters: a reference and the fast path.

Semantics (what every implementation must compute), for a wrapped layer with base output ``y0``::

    for each row b:                                  # x: (B, T, d_in), y0: (B, T, d_out)
        w = weights of slot[b] in this layer          # None for "__base__" or an uncovered layer
        if w is None: out[b] = y0[b]; continue
        h = x[b] @ w.A.T                              # (T, r)   embeddings: h = w.A[ids[b]]
        d = h @ w.B.T (+ w.bias)                      # (T, d_out), B and bias pre-scaled
        if w.dora_scale is not None:                  # DoRA: g * (W0 x + s B A x) + bias
            d = (w.dora_scale - 1) * (y0[b] - base_bias) + w.dora_scale * d
        out[b] = y0[b] + d

``lora_delta_reference`` is that loop, literally. ``apply_lora`` is the grouped fast path: rows are
grouped by slot once per call (``BatchMapping.groups``), so each layer does two matmuls per distinct
adapter, on a view when the group's rows are contiguous, and nothing for rows of the base model.
FLOPs: exactly each row's own rank. (A concatenated path, the batch's adapters stacked along the
rank axis with per-row masks, was tried and removed: every row paid the sum of the ranks, it kept
a second copy of the batch's adapters, and it measured slower on the core benchmark's decode step,
CPU time 1.55-1.58x the base step against 1.39-1.51x.)

The grouped path adds into flat views of ``y`` with ``addmm_`` where the weights are plain LoRA (no
bias, no DoRA): ``y[t0:t1] += (x[t0:t1] @ A.T) @ B.T`` in four dispatcher calls per group, with the
transposed views made once per adapter (``SlotWeights.A_t`` / ``B_t``).

Decode steps (at most ``KERNEL_MAX_ROW_TOKENS`` tokens per row, float32 on the CPU) hand every plain
group of the layer to the compiled kernel in one call (``loramux.cpu_kernel``, same semantics; a
token's result does not depend on the rest of the batch). Prefill keeps MKL, which wins once a
group has more than ~16 tokens of rank 64; with more than one thread and more than one plain group,
the groups' MKL calls are spread over the threads whole (``grouped_lora_add_rows``) instead of each call
being split over them. DoRA, bias and embedding groups always take the torch path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loramux import cpu_kernel
from loramux.mapping import BatchMapping
from loramux.slots import SlotTable, SlotWeights


def _low_rank(x: torch.Tensor, w: SlotWeights, embedding: bool) -> torch.Tensor:
    # x: (..., d_in) -> (..., r); embeddings: ids (...) -> (..., r)
    h = F.embedding(x, w.A) if embedding else x @ w.A.T
    # (..., r) -> (..., d_out)
    return torch.addmm(w.bias, h.reshape(-1, h.shape[-1]), w.B.T).view(*h.shape[:-1], -1) if w.bias is not None else h @ w.B.T


def _delta(x: torch.Tensor, y0: torch.Tensor, w: SlotWeights, embedding: bool, base_bias: torch.Tensor | None) -> torch.Tensor:
    d = _low_rank(x, w, embedding)
    if w.dora_scale is not None:
        y_no_bias = y0 if base_bias is None else y0 - base_bias
        d = (w.dora_scale - 1) * y_no_bias + w.dora_scale * d
    return d


def lora_delta_reference(x: torch.Tensor, y0: torch.Tensor, table: SlotTable, row_slots: tuple[int, ...],
                         embedding: bool = False, base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The docstring's loop, row by row: slow, obvious, the oracle for ``apply_lora``."""
    out = y0.clone()
    for b, slot in enumerate(row_slots):
        w = table.get(slot)
        if w is not None:
            out[b] = y0[b] + _delta(x[b], y0[b], w, embedding, base_bias)
    return out


def apply_lora(y: torch.Tensor, x: torch.Tensor, table: SlotTable, mapping: BatchMapping,
               embedding: bool = False, base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Add each row's adapter delta to the base output ``y`` (B, ..., d_out), in place, and return it."""
    return _apply_grouped(y, x, table, mapping.for_rows(x.shape[0]), embedding, base_bias)


def _apply_grouped(y: torch.Tensor, x: torch.Tensor, table: SlotTable, mapping: BatchMapping,
                   embedding: bool, base_bias: torch.Tensor | None) -> torch.Tensor:
    # Groups touch disjoint rows, so a DoRA group may read ``y`` for its rows after other groups wrote.
    flat = not y.requires_grad and not embedding and y.is_contiguous()
    if flat:
        # one flat view each, made once per layer: a group's rows b0:b1 are the tokens b0*T:b1*T, so a
        # plain group costs four dispatcher calls (two slices, mm, addmm_). Per-group reshapes,
        # transposes and adds cost more than the rank-8..64 matmuls of a decode step.
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])   # (B*T, d_in), (B*T, d_out)
        per_row = x2.shape[0] // max(x.shape[0], 1)                       # T
    groups = mapping.groups(x.device)
    done: frozenset[int] = frozenset()
    if flat and per_row <= KERNEL_MAX_ROW_TOKENS and x2.is_contiguous() and x.dtype == torch.float32 and x.device.type == "cpu":
        done = _apply_kernel(y2, x2, table, mapping, per_row)
        if len(done) == len(groups):
            return y
    elif flat and len(groups) > 1 and x.dtype == torch.float32 and x.device.type == "cpu" and torch.get_num_threads() > 1:
        done = _apply_rows_kernel(y2, x2, table, groups, per_row)
    for group in groups:
        w = table.get(group.slot)
        if w is None or group.slot in done:
            continue
        if flat and w.bias is None and w.dora_scale is None and not isinstance(group.rows, torch.Tensor):
            if group.covers_all:
                y2.addmm_(torch.mm(x2, w.A_t), w.B_t)              # (B*T, d_out) += (B*T, r) @ (r, d_out)
            else:
                t0, t1 = group.rows.start * per_row, group.rows.stop * per_row
                y2[t0:t1].addmm_(torch.mm(x2[t0:t1], w.A_t), w.B_t)
        elif group.covers_all:
            d = _delta(x, y, w, embedding, base_bias)
            y = y + d if y.requires_grad else y.add_(d)
        elif isinstance(group.rows, slice):
            # (b_group, ..., d_in) view -> (b_group, ..., d_out), added into the same rows of y
            rows = y[group.rows]
            rows.add_(_delta(x[group.rows], rows, w, embedding, base_bias))
        else:
            # gather (b_group, ..., d_in) -> scatter-add (b_group, ..., d_out)
            y.index_add_(0, group.rows, _delta(x[group.rows], y[group.rows], w, embedding, base_bias))
    return y


# Rows with at most this many tokens (decode steps) take the compiled CPU kernel when it is available.
KERNEL_MAX_ROW_TOKENS = 1


def _apply_kernel(y2: torch.Tensor, x2: torch.Tensor, table: SlotTable, mapping: BatchMapping, per_row: int) -> frozenset[int]:
    """Add the plain-LoRA groups' deltas into ``y2`` (B*T, d_out) with one kernel call; returns the
    slots done (none when the kernel is unavailable), the caller does the others."""
    call = kernel_call(table, mapping, x2.device, per_row)
    if call is None:
        return frozenset()
    done, args = call
    if done:
        cpu_kernel.load().grouped_lora_add(y2, x2, *args)
    return done


def _apply_rows_kernel(y2: torch.Tensor, x2: torch.Tensor, table: SlotTable, groups, per_row: int) -> frozenset[int]:
    """Prefill: the plain-LoRA groups whose rows are contiguous, in one call that gives the threads whole groups
    (``grouped_lora_add_rows``: the same two torch calls per group, each single-threaded, instead of every
    small matmul split over the threads); returns the slots done, none without the kernel or with one group."""
    module = cpu_kernel.load()
    if module is None:
        return frozenset()
    slots, starts, ends, A, B_t = [], [], [], [], []
    for group in groups:
        w = table.get(group.slot)
        if w is not None and w.kernel_ready and isinstance(group.rows, slice):
            slots.append(group.slot)
            starts.append(group.rows.start * per_row)
            ends.append(group.rows.stop * per_row)
            A.append(w.A)      # (r, d_in)
            B_t.append(w.B_t)  # (r, d_out), pre-scaled
    if len(slots) < 2:  # one group: MKL splitting its matmuls over the threads is the better use of them
        return frozenset()
    module.grouped_lora_add_rows(y2, x2, starts, ends, A, B_t)
    return frozenset(slots)


def kernel_call(table: SlotTable, mapping: BatchMapping, device: torch.device, per_row: int) -> tuple | None:
    """(slots done, (tokens, starts, ends, A, B_t)): the grouped kernel's share of this layer's groups and the
    arguments after ``y2, x2`` of its call; None when the kernel is unavailable. The arguments are kept on the
    batch's mapping (once per layer per mapping: the engine's decode batch keeps one over many steps)."""
    if cpu_kernel.load() is None:
        return None
    tokens, ranges = mapping.token_ranges(device, per_row)
    args = mapping._kernel_args.get(table)
    if args is None:
        args = mapping._kernel_args[table] = _kernel_args(table, ranges)
    done, starts, ends, A, B_t = args
    return done, (tokens, starts, ends, A, B_t)


def _kernel_args(table: SlotTable, ranges: tuple[tuple[int, int, int], ...]) -> tuple:
    """(slots, starts, ends, A list, B_t list) of the kernel-ready groups in ``ranges``; kept on the
    batch's mapping (consecutive decode steps reuse it), because building them costs more Python
    time per layer than the kernel spends on a rank-8 group."""
    slots, starts, ends, A, B_t = [], [], [], [], []
    for slot, start, end in ranges:
        w = table.get(slot)
        if w is not None and w.kernel_ready:
            slots.append(slot)
            starts.append(start)
            ends.append(end)
            A.append(w.A)      # (r, d_in)
            B_t.append(w.B_t)  # (r, d_out), pre-scaled
    return frozenset(slots), starts, ends, A, B_t
