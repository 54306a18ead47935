"""The safetensors header of an adapter file, read and checked without reading a byte of tensor data.

A safetensors file is ``u64 little-endian header length | JSON header | data``; the header gives
each tensor's dtype, shape and byte range. Reading it first lets loramux refuse a file whose
tensors do not fit the base model (or whose header lies about sizes) before it allocates memory
for them: a header that declares a 2 GiB ``lora_A`` costs a few hundred bytes to refuse.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from loramux.config_schema import show
from loramux.errors import AdapterWeightsError

# safetensors' own limit for the header (its Rust reader refuses larger ones)
MAX_HEADER_BYTES = 100_000_000

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
            "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the header declares it."""

    dtype: str                 # safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]
    start: int = field(default=0, compare=False)  # its first byte in the data section (after the header)

    @property
    def floating(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def _corrupt(path: Path, why: str) -> AdapterWeightsError:
    return AdapterWeightsError(f"{path}: cannot be read ({why}); the file is truncated or corrupt, copy it again")


def read_header(path: Path) -> dict[str, TensorSpec]:
    """Parse and check the header: known dtypes, non-negative shapes, byte ranges that fit the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise _corrupt(path, f"header length {n} exceeds the file ({size} bytes) or the 100 MB limit")
            raw = f.read(n)
    except OSError as exc:
        raise _corrupt(path, str(exc)) from exc
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # ValueError covers JSONDecodeError and int limits
        raise _corrupt(path, f"header is not valid JSON: {type(exc).__name__}: {show(str(exc))}") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is a JSON {type(header).__name__}, not an object")
    data_bytes = size - 8 - n
    specs: dict[str, TensorSpec] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        # json.loads makes exact dict/list/int/str (never subclasses; a bool is not an int by type), so
        # ``type(x) is`` checks say what isinstance did, at a fraction of its cost over ~400 entries
        if type(entry) is not dict:
            raise _corrupt(path, f"header entry {show(key)} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        itemsize = ITEMSIZE.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            raise _corrupt(path, f"tensor {show(key)} has unknown dtype {show(dtype)}")
        # one pass over the dims: ints (not bools), non-negative; their product
        numel = 1
        if type(shape) is not list:
            numel = -1
        else:
            for d in shape:
                if type(d) is not int or d < 0:
                    numel = -1
                    break
                numel *= d
        if numel < 0:
            raise _corrupt(path, f"tensor {show(key)} has invalid shape {show(shape)}")
        if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise _corrupt(path, f"tensor {show(key)} has data_offsets {show(offsets)} outside the file's "
                                 f"{data_bytes} data bytes")
        if offsets[1] - offsets[0] != numel * itemsize:
            raise _corrupt(path, f"tensor {show(key)}: shape {tuple(shape)} of {dtype} needs {numel * itemsize} bytes "
                                 f"but data_offsets span {offsets[1] - offsets[0]}")
        specs[key] = TensorSpec(dtype, tuple(shape), offsets[0])
    return specs
