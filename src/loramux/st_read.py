"""A safetensors file's tensors from one read into one buffer the adapter owns.

Why: ``safetensors.torch.load_file(backend="pread")`` allocates and reads every tensor on its own. A
210-module adapter has 420 tensors, and that per-tensor work was ~10 ms of a 9.8 MB file the page cache
serves in ~2 ms. Here the data section is read with one ``readinto`` into one buffer and each tensor is
a view of it, made from the header ``st_header.read_header`` already parsed and checked.

- The same files are refused as before: safetensors still opens the file first (its own header
  validation: offsets contiguous, no overlaps or gaps, metadata a string map), without reading data.
- The buffer is memory the adapter owns, not a mapping of the file: a mapping would keep every byte
  resident as long as a tensor lives, and crash the process (SIGBUS) if the file is rewritten in place.
- The buffer comes from numpy where transparent huge pages are on (``huge_pages.available``; off with
  ``LORAMUX_HUGE_PAGES=0``): numpy madvises large arrays onto 2 MiB pages, and a fresh 78 MB buffer then
  fills at ~3 GB/s instead of ~1 GB/s on 4 KiB pages (page faults). Measured here (one process, loads
  kept resident, the two alternating by round, 10 rounds): rank-32/64 loads 49/76 ms vs 72/119 ms on
  4 KiB pages, ranks 8/16 the same; but 2 of 10 rank-64 loads took 210-235 ms (the kernel compacting
  memory for huge pages on first touch, THP defrag ``madvise``), where 4 KiB pages never passed 132 ms.
- ``share=False`` (the file holds tensors a load drops or copies: modules_to_save, saved base layers)
  gives every tensor its own memory, as before, so no dropped tensor's bytes stay held by the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux import huge_pages
from loramux.st_header import FLOAT_DTYPES, ITEMSIZE, TensorSpec
from loramux.strided import kind, spaced_runs

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class FileTensors:
    """The tensors of one file, by key; ``runs`` are typed 1-D views of the buffer, each covering consecutive
    float tensors of one dtype (one reduction checks all of them), and ``in_runs`` the keys they cover;
    both empty when the tensors do not share a buffer."""

    tensors: dict[str, torch.Tensor]
    runs: list[torch.Tensor]
    in_runs: set[str]


def _buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised (nbytes,) uint8 CPU tensor, on huge pages where they are available."""
    if huge_pages.available():
        import numpy as np

        return torch.from_numpy(np.empty(nbytes, dtype=np.uint8))
    return torch.empty(nbytes, dtype=torch.uint8)


def read_data(path: Path, data_start: int, nbytes: int) -> torch.Tensor:
    """The ``nbytes`` bytes of ``path`` from ``data_start``, with one ``readinto`` (a short read raises OSError)."""
    buf = _buffer(nbytes)
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:  # readinto may return less than asked (signals, pipes); files give all at once
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"file ended after {done} of {nbytes} data bytes")
            done += got
    return buf


def read_tensors(path: Path, specs: dict[str, TensorSpec], *, share: bool) -> FileTensors:
    """Every tensor ``specs`` declares; views of one buffer when ``share``, else each in its own memory.

    Raises what safetensors raises for a file it refuses (``SafetensorError``) and ``OSError``."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    with safe_open(str(path), framework="pt") as f:  # safetensors' own validation of the header; no data read
        declared = set(f.keys())
    if declared != specs.keys():  # the file changed since its header was read
        raise OSError("the file changed while it was read")
    order = sorted(specs.items(), key=lambda kv: kv[1].start)
    sizes = [spec.nbytes for _, spec in order]
    nbytes = max((spec.start + n for (_, spec), n in zip(order, sizes)), default=0)
    buf = read_data(path, data_start, nbytes)
    views = _views(buf, order, nbytes)
    tensors = {key: views[key] if share else views[key].clone() for key, _ in order}  # file order, as safetensors
    runs: list[torch.Tensor] = []
    in_runs: set[str] = set()
    if not share:
        return FileTensors(tensors=tensors, runs=runs, in_runs=in_runs)
    run = None  # [dtype, start, end] of the float run being extended
    for (key, spec), size in zip(order, sizes):
        if spec.dtype not in FLOAT_DTYPES or spec.start % ITEMSIZE[spec.dtype]:
            continue
        in_runs.add(key)
        if run is not None and run[0] == spec.dtype and run[2] == spec.start:
            run[2] += size
            continue
        if run is not None:
            runs.append(_typed(buf, run))
        run = [spec.dtype, spec.start, spec.start + size]
    if run is not None:
        runs.append(_typed(buf, run))
    return FileTensors(tensors=tensors, runs=[r for r in runs if r.numel()], in_runs=in_runs)


def _typed(buf: torch.Tensor, run: list) -> torch.Tensor:
    """The bytes [start, end) of ``buf`` as a 1-D tensor of ``dtype`` (run = [dtype, start, end])."""
    dtype, start, end = run
    return buf[start:end].view(TORCH_DTYPES[dtype])


def _views(buf: torch.Tensor, order: list[tuple[str, TensorSpec]], nbytes: int) -> dict[str, torch.Tensor]:
    """Every tensor as a view of ``buf``: tensors of one kind, dtype and shape equally spaced (one per layer)
    come from one strided view of the run, split in one call; a misaligned one is a copy of its bytes."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    views: dict[str, torch.Tensor] = {}
    for key, spec in order:
        if spec.start % ITEMSIZE[spec.dtype]:  # a writer without safetensors' padding
            views[key] = buf[spec.start: spec.start + spec.nbytes].clone().view(TORCH_DTYPES[spec.dtype]).view(spec.shape)
        else:
            groups.setdefault((kind(key), spec.dtype, spec.shape), []).append((spec.start, key))
    typed: dict[str, torch.Tensor] = {}  # dtype name -> the whole buffer viewed as that dtype
    for (_, dtype, shape), members in groups.items():
        itemsize = ITEMSIZE[dtype]
        flat = typed.get(dtype)
        if flat is None:
            flat = typed[dtype] = buf[: nbytes - nbytes % itemsize].view(TORCH_DTYPES[dtype])
        numel, strides = math.prod(shape), _strides(shape)
        for positions, step in spaced_runs([start // itemsize for start, _ in members], numel):
            first = members[positions[0]][0] // itemsize
            # (n, *shape) over the run, n tensors ``step`` elements apart -> n views of shape
            run = flat.as_strided((len(positions), *shape), (step, *strides), first)
            for p, view in zip(positions, run.unbind(0)):
                views[members[p][1]] = view
    return views


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape`` in elements."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))
