"""The base model's large weights moved once onto transparent huge pages (Linux), for the decode kernels.

Why: a decode step streams every weight of the base model once, 513 MiB for the default model. On 4 KiB
pages that is a TLB miss every 64 cache lines, and in a virtual machine each miss is a two-level page walk.
Measured on the development machine (AMD EPYC VM, THP ``madvise``, one process, alternating): the decode GEMM
over the default model's weights at one row took 33.5 vs 36.3 ms on 1 thread and 27.6 vs 29.7 ms on 2 threads
with the weights on 2 MiB pages; a plain 256 MiB ``sum()`` read 19.6 vs 18.7 GB/s.

How: one arena from numpy, which asks the kernel for huge pages (``madvise(MADV_HUGEPAGE)``) on large
allocations on Linux; every large parameter and int8 weight buffer is copied into it (64-byte aligned, same
shape, dtype and layout) and the module keeps its ``nn.Parameter`` object with ``.data`` pointing there. Each
tensor gets its own storage (``torch.from_numpy`` of its own slice), so ``save_pretrained``/safetensors see
separate tensors as before, and tied parameters (one ``Parameter`` in two modules) stay tied. The arena is
freed when the last of its tensors is. A no-op where THP is off, on other systems, or with
``LORAMUX_HUGE_PAGES=0``.
"""
from __future__ import annotations

import logging
import os
import sys
import weakref
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

MIN_BYTES = 256 * 1024  # smaller tensors (norms, biases) are not worth a move
ALIGN = 64  # a cache line: the kernels' vector loads never split one at a row start
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_moved: weakref.WeakSet = weakref.WeakSet()  # models already moved: a second install copies nothing


def available() -> bool:
    """Linux with transparent huge pages on (``always`` or ``madvise``), numpy madvising them, not disabled."""
    if os.environ.get("LORAMUX_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import numpy as np

        return "[never]" not in _THP.read_text() and bool(np._core.multiarray._get_madvise_hugepage())
    except (OSError, ImportError, AttributeError):  # no THP switch, or a numpy without the madvise knob
        return False


def _candidates(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor, int]]:
    """(module, name, tensor, data_ptr) for every large contiguous CPU parameter and buffer, each place it is
    held; tensors whose storage also holds another of the model's tensors stay where they are (moving them
    apart would break that aliasing)."""
    out = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if (tensor is not None and tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_quantized
                        and tensor.numel() * tensor.element_size() >= MIN_BYTES):
                    out.append((module, name, tensor, tensor.data_ptr()))
    tensors_of: dict[int, set[int]] = {}  # storage -> the distinct tensors (by data_ptr) in it
    for _, _, tensor, ptr in out:
        tensors_of.setdefault(tensor.untyped_storage().data_ptr(), set()).add(ptr)
    return [entry for entry in out if len(tensors_of[entry[2].untyped_storage().data_ptr()]) == 1]


def move_weights(model: nn.Module) -> int:
    """Move ``model``'s large parameters and buffers onto huge pages; returns the bytes moved (0 if unavailable).
    Values, shapes, dtypes, ``Parameter`` objects and ties are unchanged; only where the bytes live."""
    if not available() or model in _moved:
        return 0
    import numpy as np

    _moved.add(model)

    held = _candidates(model)
    unique = {ptr: tensor for _, _, tensor, ptr in held}  # a tied weight moves once
    if not unique:
        return 0
    padded = {ptr: -(-t.numel() * t.element_size() // ALIGN) * ALIGN for ptr, t in unique.items()}
    arena = np.empty(sum(padded.values()) + ALIGN, dtype=np.uint8)
    offset = -arena.ctypes.data % ALIGN
    moved: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for ptr, tensor in unique.items():
            view = arena[offset:offset + tensor.numel() * tensor.element_size()]
            moved[ptr] = torch.from_numpy(view).view(tensor.dtype).view(tensor.shape).copy_(tensor)  # its own storage
            offset += padded[ptr]
    for module, name, tensor, ptr in held:
        if isinstance(tensor, nn.Parameter):
            tensor.data = moved[ptr]  # the same Parameter object (and its ties), new bytes
        else:
            module._buffers[name] = moved[ptr]
    total = sum(padded.values())
    logger.debug("moved %d tensors (%.0f MiB) of the base model onto huge pages", len(moved), total / 2**20)
    return total
