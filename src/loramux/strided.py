"""Tensors equally spaced in one buffer, found so that one strided view (and one torch call) covers them.

An adapter file holds the same modules of every layer one layer block apart (its tensors sorted by
name, each layer's block the same size): the 30 ``q_proj.lora_B`` of a Llama are one (30, d_out, r)
view of the file's buffer with a stride of one block. Taking and transforming them a run at a time
costs one torch call per run instead of one per tensor (~2-5 us each, ~400 tensors in a load).
"""
from __future__ import annotations

import functools
import re

_INDEX = re.compile(r"\.\d+(?=\.|$)")  # a layer index in a module name: "layers.12.self_attn.q_proj"


@functools.lru_cache(maxsize=1 << 16)  # the same names come back with every adapter of a model
def kind(name: str) -> str:
    """``name`` without its layer indices: the tensors of one kind lie one layer block apart in a file."""
    return _INDEX.sub(".#", name)


def spaced_runs(offsets: list[int], size: int) -> list[tuple[list[int], int]]:
    """Positions in ``offsets`` (ascending) split into runs equally spaced by a step of at least ``size``
    (so no two overlap), in order; each run with its step (``size`` for a run of one)."""
    runs: list[list] = []  # [positions, step]
    last = 0
    for i, off in enumerate(offsets):
        run = runs[-1] if runs else None
        if run is not None and (off - last == run[1] if len(run[0]) > 1 else off - last >= max(size, 1)):
            run[0].append(i)
            run[1] = off - last
        else:
            runs.append([[i], size])
        last = off
    return [(positions, step) for positions, step in runs]
