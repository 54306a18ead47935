"""The base model's linears for decode steps: a streaming fp32 GEMM for few rows (``csrc/decode_gemm.cpp``).

Why: a decode step of the default model is ~211 matmuls (7 per layer and the vocabulary projection)
with 1-32 rows each, 85% of the step in plain transformers. MKL reads the weights at ~12 GB/s at
those shapes on the AMD EPYC development machine, against ~33 GB/s for a plain reduction; the kernel
reads each weight matrix once for all rows with AVX2/AVX-512 FMA and gets close to the reduction's
bandwidth (figures in BENCHMARKS.md).

How it is used: ``install(model)`` (called by ``MultiLoraModel.__init__``) switches the class of every
plain ``nn.Linear`` of the base model, the vocabulary projection included, to :class:`DecodeLinear`, an
``nn.Linear`` subclass whose forward is one call into the kernel. Nothing is re-laid: the kernel reads
``weight`` in nn.Linear's own (d_out, d_in) layout, so tied embeddings, in-place merges, ``state_dict`` and
adapter targeting (``isinstance(m, nn.Linear)``) are untouched; the large weights are moved once onto huge
pages (``huge_pages.py``: same values, layout and Parameter objects, ~7% faster streaming at B1). Inside that call,
inputs with more than ``MAX_ROWS`` rows (prefill), other dtypes or devices, and autograd go to
``at::linear`` (MKL) as before.

The same call also switches Llama-style RMSNorms (the class's forward is transformers' ``LlamaRMSNorm``
code, character for character) to one fused kernel call instead of 7 ATen ops: the next largest
per-step cost at B1 once the matmuls are fast (~61 norms per step of the default model), points
the model's SDPA attention at the kernel's one-token attention (``decode_attention.py``), and gives
Llama-code decoder layers a decode-step forward with fewer ops around the same modules
(``decode_layers.py``), and Llama-code decoder models one kernel call for all their layers in a decode step
(``decode_stack.py``).

At one row, float32 has two tile shapes with the same results; which streams faster depends on the CPU, so
the first large model installed times both on its own weights (``one_row_tiles.py``).

Semantics: ``F.linear(x, weight, bias)``, with float32 rounding in the kernel's own fixed order; a row's
result does not depend on the other rows of the call or on the number of threads (bit for bit).

Built per ISA (AVX2+FMA or AVX-512F, from torch's run-time CPU capability) into ``$LORAMUX_HOME/kernels``
on first use (~40 s; ``make install`` does it ahead). Elsewhere, without a compiler, or with
``LORAMUX_CPU_KERNEL=0``, ``install`` leaves the model as it is: the same results through torch.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loramux import cpu_kernel, decode_attention, decode_layers, decode_stack, huge_pages, one_row_tiles

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_gemm.cpp"

# Inputs with at most this many rows take the kernel; more (prefill) take MKL. Measured on the
# default model's shapes (2 threads, AMD EPYC AVX2): the kernel is ahead of MKL up to 64 rows and
# behind from ~128 (benchmarks/bench_core.py prints both). On an Intel Xeon with AVX-512, where MKL is
# at home, still ahead at 64: the 210 layer matmuls at 1/16/32/48/64 rows take 17.8/29.0/38.4/48.4/62.4 ms
# against MKL's 19.0/42.0/47.2/55.2/66.5 (2026-12-02).
MAX_ROWS = 64

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the loaded extension, or None once tried


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel for this CPU's ISA, building it once; None if disabled, no ISA, or no build."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build(verbose) if cpu_kernel.enabled() else None
    return _state["module"]  # type: ignore[return-value]


def _build(verbose: bool) -> ModuleType | None:
    isa = cpu_kernel.isa()
    if isa is None:
        logger.info("no AVX2/AVX-512 on this CPU: the base model's linears stay on torch")
        return None
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", *cpu_kernel.ISA_FLAGS[isa]]  # FMA only where written
    return cpu_kernel.build_extension(f"loramux_decode_gemm_{isa}", SOURCE, flags, f"decode GEMM ({isa})", verbose)


class DecodeLinear(nn.Linear):
    """``nn.Linear`` whose forward goes through the decode GEMM kernel (MKL above ``MAX_ROWS`` rows).

    Made by switching the class of an existing ``nn.Linear`` (``install``): same parameters, same
    ``state_dict``, no copy. Only created when the kernel is loaded.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _KERNEL.decode_linear(input, self.weight, self.bias, MAX_ROWS)


_KERNEL: ModuleType | None = None  # set by install() before any DecodeLinear exists


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _KERNEL.rms_norm(hidden_states, self.weight, self.variance_epsilon)


_fused_norms: dict[type, type | None] = {}


def _fused_norm_class(cls: type) -> type | None:
    """A subclass of ``cls`` whose forward is the kernel's ``rms_norm``, if ``cls.forward`` is, to the
    character, transformers' ``LlamaRMSNorm.forward`` (Llama, Mistral, Qwen2/3 ... keep copies of it);
    else None. The subclass is registered in this module so that pickling finds it by name."""
    if cls not in _fused_norms:
        fused = None
        try:
            import inspect

            from transformers.models.llama.modeling_llama import LlamaRMSNorm

            if inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward):
                name = f"Fused{cls.__name__}"
                fused = type(name, (cls,), {"forward": _rms_norm_forward, "__module__": __name__, "__qualname__": name,
                                            "__doc__": f"``{cls.__name__}`` through the kernel's fused RMSNorm."})
                globals()[name] = fused
        except (ImportError, OSError, TypeError):  # no transformers, no source: leave such norms alone
            fused = None
        _fused_norms[cls] = fused
    return _fused_norms[cls]


def install(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` with float32 CPU weights to :class:`DecodeLinear`, and
    Llama-style RMSNorms to the fused one (``_fused_norm_class``).

    Returns how many linears were switched (0 when the kernel is unavailable: the model is left as it is;
    0 too for an int8 base, whose layers already call the kernel, but its norms and attention are switched).
    Subclasses of ``nn.Linear`` (quantized or already wrapped layers) are left alone.
    """
    global _KERNEL
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu"]
    int8 = any(getattr(m, "is_quantized", False) for m in model.modules())  # quantize.py's layers: norms, attention
    if not linears and not int8:
        return 0
    kernel = load()
    if kernel is None:
        return 0
    one_row_tiles.from_environment()  # a bad LORAMUX_ONE_ROW_TILES is refused before the model changes
    _KERNEL = kernel
    for module in linears:
        module.__class__ = DecodeLinear
    norms = 0
    for module in model.modules():
        if isinstance(getattr(module, "variance_epsilon", None), float) and isinstance(getattr(module, "weight", None), torch.Tensor):
            fused = _fused_norm_class(type(module))
            if fused is not None:
                module.__class__ = fused
                norms += 1
    attention = decode_attention.install(model, kernel)
    lean = decode_layers.install(model, kernel, tuple(f for f in _fused_norms.values() if f is not None), DecodeLinear,
                                 MAX_ROWS)
    stacked = decode_stack.install(model, kernel)
    moved = huge_pages.move_weights(model)
    if linears:  # after the move: the shapes are timed on the pages the weights will stay on
        one_row_tiles.choose(kernel, linears)
    logger.debug("decode GEMM kernel on %d linear layers, fused RMSNorm on %d, decode attention on %d configs, "
                 "lean decode forward on %d layers (%d decoder stacks in one call), %.0f MiB of weights on huge pages",
                 len(linears), norms, attention, lean, stacked, moved / 2**20)
    return len(linears)


def uninstall(model: nn.Module) -> int:
    """Back to plain ``nn.Linear`` and the original norms (e.g. for code that checks ``type(m) is nn.Linear``)."""
    count = 0
    fused = {f: cls for cls, f in _fused_norms.items() if f is not None}
    for module in model.modules():
        if type(module) is DecodeLinear:
            module.__class__ = nn.Linear
            count += 1
        elif type(module) in fused:
            module.__class__ = fused[type(module)]
    decode_attention.uninstall(model)
    decode_stack.uninstall(model)
    decode_layers.uninstall(model)
    return count


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, through torch: the oracle of the tests."""
    return F.linear(x, weight, bias)


def _reset_for_tests() -> None:
    _state.clear()
