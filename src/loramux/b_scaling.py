"""A load's ``lora_B`` tensors scaled by alpha/r and transposed into the slot layout, a group at a time.

``SlotWeights`` keeps ``B`` as the transposed view of a contiguous (r, d_out) float32 tensor, scaled by the
module's scaling. Done per module that was ~4 torch calls each, ~850 for a 210-module adapter: most of a
small adapter's load. Modules whose B have one shape, dtype and scaling (the 30 ``q_proj`` of a Llama,
...) are done together: one copy and one multiply over a (n, d_out, r) stack. An adapter file read by
``st_read`` holds them equally spaced in one buffer (the file's tensors sorted by name, every layer block
the same size), so the stack is a strided view of that buffer and the result can be written back over
the B's own bytes (``in_place``): a fresh allocation page-faults at ~1.5 GB/s here, where the file's bytes
were read at 3-5 GB/s. Elementwise, each value is computed by the same ``torch.mul`` as one module at a
time: the results are the same bits.
"""
from __future__ import annotations

import numpy as np
import torch

from loramux.strided import kind, spaced_runs


CHUNK_BYTES = 1 << 20  # a run is done this much at a time: its copy stays in cache between the two passes


def _runs(members: list[tuple[int, torch.Tensor]]) -> list[tuple[list[int], int | None]]:
    """``members`` ((index, B) of one group) split into runs of B equally spaced in one storage, in storage
    order, at most CHUNK_BYTES each, with their step in elements (None: a B that is not contiguous, alone)."""
    numel = members[0][1].numel()
    by_storage: dict[int, list[tuple[int, int]]] = {}
    runs: list[tuple[list[int], int | None]] = []
    for i, B in members:
        if B.is_contiguous():
            by_storage.setdefault(B.untyped_storage().data_ptr(), []).append((B.storage_offset(), i))
        else:
            runs.append(([i], None))
    chunk = max(1, CHUNK_BYTES // max(1, numel * 4))
    for placed in by_storage.values():
        placed.sort()
        for positions, step in spaced_runs([off for off, _ in placed], numel):
            idx = [placed[p][1] for p in positions]
            runs += [(idx[j: j + chunk], step) for j in range(0, len(idx), chunk)]
    return runs


def scaled_transposed(Bs: list[tuple[str, torch.Tensor, float]],
                      in_place: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each ``(module, lora_B (d_out, r), scaling)``: ``(scaling * lora_B).T``, a contiguous (r, d_out)
    float32 tensor. Modules are grouped by their name without layer indices (``q_proj`` of every layer):
    in a file those lie one layer block apart, where q/o/down_proj of one shape lie interleaved.

    ``in_place=True`` says the B are the load's own and share no bytes with any other tensor (``st_read``
    buffers, whose offsets safetensors checked): float32 runs are then written over their own memory.
    Also returns each group's (n, r, d_out) result, which covers its members (one reduction checks them)."""
    out: list[torch.Tensor | None] = [None] * len(Bs)
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for i, (module, B, scaling) in enumerate(Bs):
        groups.setdefault((kind(module), tuple(B.shape), B.dtype, B.device, scaling), []).append((i, B))
    stacks: list[torch.Tensor] = []
    scratch: torch.Tensor | None = None  # the copy of a run being written over itself, reused run to run
    for (_, shape, dtype, _, scaling), members in groups.items():
        d_out, rank = shape
        by_index = dict(members)
        for run, step in _runs(members):
            first, n = by_index[run[0]], len(run)  # the run's first B in storage order
            if step is None:  # not contiguous: a copy, then a fresh result
                src = torch.stack([by_index[i] for i in run])
            else:  # (n, d_out, r) over the run's bytes
                src = first.as_strided((n, d_out, rank), (step, rank, 1), first.storage_offset())
            if in_place and step is not None and dtype == torch.float32:
                if scratch is None or scratch.numel() < src.numel():
                    scratch = torch.empty(src.numel(), dtype=torch.float32)
                src = scratch[: src.numel()].view(n, d_out, rank).copy_(src)
                # (n, r, d_out) over the same bytes the run held as (n, d_out, r)
                dst = first.as_strided((n, rank, d_out), (step, d_out, 1), first.storage_offset())
            else:
                dst = torch.empty(n, rank, d_out, dtype=torch.float32)
            _scale_transposed(src, scaling, dst)
            stacks.append(dst)
            for i, t in zip(run, dst.unbind(0)):
                out[i] = t
    return out, stacks


def _scale_transposed(src: torch.Tensor, scaling: float, dst: torch.Tensor) -> None:
    """``dst = scaling * src.transpose(1, 2)``: (n, d_out, r) -> (n, r, d_out).

    For float32 on the CPU numpy's strided loop does it, ~2x faster than torch's at ranks 8-16 (it is a
    transposition with a short inner axis; measured here, one thread). The values are torch's: a float32
    times the scaling rounded to float32, which is what ``torch.mul`` with a Python scalar computes (the
    tests compare both bit for bit)."""
    if (src.dtype == torch.float32 and src.device.type == "cpu" and dst.device.type == "cpu"
            and not src.requires_grad and not dst.requires_grad):
        np.multiply(src.numpy().transpose(0, 2, 1), np.float32(scaling), out=dst.numpy())
    else:
        torch.mul(src.transpose(1, 2), scaling, out=dst)
