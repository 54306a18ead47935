"""Which of the decode GEMM's two float32 one-row tile shapes streams faster on this CPU, measured once a process.

Why: a B1 decode step is the base model's weights streamed once, and how fast a loop streams them depends on the
CPU's prefetchers more than on its arithmetic. The kernel (``csrc/decode_gemm.cpp``, ``one_row_tile``) has two
shapes that give the same bits: 8-row tiles that leave prefetching to the hardware (faster on the AMD EPYC with
AVX2 of sessions 1-11), and 2-row tiles that prefetch the next tile as they go (faster on the AMD EPYC with
AVX-512 of 2026-12-03: the 211 matmuls of a B1 step of the default model 11.4 / 14.9 / 10.0 ms against 14.4 /
16.6 / 10.5 on 2 threads in three runs; the whole B1 step 16.9 vs 17.9 ms). Neither wins everywhere, so the
first model ``dense_kernel.install`` switches that has at least ``MIN_BYTES`` of float32 linear weights (more
than a cache holds, so the timing is of streaming) times both shapes on its own weights at one row, alternating,
the best of ``ROUNDS`` each, and the faster is kept for the process (~0.1 s once, at the default model's size).
Smaller models keep the 8-row shape without measuring.

``LORAMUX_ONE_ROW_TILES=8`` or ``=2`` sets the shape without measuring (benchmarks comparing the two; a
machine whose measurement is known to mislead); another value is refused by ``from_environment``, which
``dense_kernel.install`` asks before it changes the model. The choice changes speed only, never a result (tests).
"""
from __future__ import annotations

import logging
import os
import time
from types import ModuleType
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

ENV = "LORAMUX_ONE_ROW_TILES"
MIN_BYTES = 64 * 2**20
ROUNDS = 3
_SHAPES = {"8": False, "2": True}  # the variable's values -> set_one_row_shape's argument

_decided: set[str] = set()  # {"once"} after the process settled on a shape (the kernel holds which one)


def from_environment() -> bool | None:
    """The shape ``LORAMUX_ONE_ROW_TILES`` sets (True: 2-row tiles), None when unset; ValueError for another value."""
    setting = os.environ.get(ENV, "").strip()
    if setting and setting not in _SHAPES:
        raise ValueError(f"{ENV}={setting!r}: use 8 (8-row tiles) or 2 (2-row tiles with prefetch), or unset it "
                         "to measure both")
    return _SHAPES.get(setting)


def choose(kernel: ModuleType, linears: list[nn.Linear], clock: Callable[[], float] = time.perf_counter) -> bool | None:
    """Set the kernel's float32 one-row shape for this process from ``LORAMUX_ONE_ROW_TILES`` or by timing
    ``linears`` (float32 CPU ``nn.Linear`` layers, weights in place) at one row; returns the shape now set
    (True: 2-row tiles), or None when nothing was decided (too few bytes to measure; 8-row tiles stay)."""
    if _decided:
        return kernel.one_row_shape()
    fixed = from_environment()
    if fixed is not None:
        return _keep(kernel, fixed, f"from {ENV}")
    if sum(m.weight.numel() * 4 for m in linears) < MIN_BYTES:
        return None
    seconds = {False: [], True: []}
    inputs = {k: torch.zeros(1, k) for k in {m.weight.shape[1] for m in linears}}  # (1, d_in) per width
    calls = [(inputs[m.weight.shape[1]], m.weight, m.bias) for m in linears]

    def one_pass() -> None:
        for x, w, b in calls:
            kernel.decode_linear(x, w, b, 1)

    with torch.inference_mode():
        for r in range(ROUNDS + 1):  # round 0 warms both up (first touch, code paths), untimed
            for shape in (False, True) if r % 2 else (True, False):
                kernel.set_one_row_shape(shape)
                if r == 0:
                    one_pass()
                    continue
                start = clock()
                one_pass()
                seconds[shape].append(clock() - start)
    eight, two = min(seconds[False]), min(seconds[True])
    return _keep(kernel, two < eight, f"measured on {len(calls)} matmuls at one row, best of {ROUNDS}: 8-row tiles "
                                      f"{eight * 1e3:.2f} ms, 2-row tiles {two * 1e3:.2f} ms")


def _keep(kernel: ModuleType, two_row_tiles: bool, why: str) -> bool:
    kernel.set_one_row_shape(two_row_tiles)
    _decided.add("once")
    logger.info("decode GEMM: float32 one-row tiles of %d rows (%s)", 2 if two_row_tiles else 8, why)
    return two_row_tiles


def _forget_for_tests(kernel: ModuleType) -> tuple[bool, bool]:
    """Undecided again, 8-row tiles set; returns what to hand ``_restore_for_tests`` afterwards."""
    saved = bool(_decided), kernel.one_row_shape()
    _decided.clear()
    kernel.set_one_row_shape(False)
    return saved


def _restore_for_tests(kernel: ModuleType, saved: tuple[bool, bool]) -> None:
    _decided.clear()
    if saved[0]:
        _decided.add("once")
    kernel.set_one_row_shape(saved[1])
