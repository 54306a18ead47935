"""Weight-only int8 base model: per-output-channel scales, the decode GEMM kernel's int8 variant.

Why: a decode step reads every base weight once, so its floor is bytes / bandwidth; int8 weights are
a quarter of fp32's bytes. Activations, LoRA adapters, norms and the KV cache stay float32.

Scheme (symmetric, per output channel ``n`` of a linear; per row of an embedding)::

    scale[n] = max_k |W[n, k]| / 127          # (N,) float32; 1 where the row is all zeros
    q[n, k]  = round(W[n, k] / scale[n])      # (N, K) int8 in [-127, 127]
    y        = (x @ q.T) * scale + b          # what Int8Linear computes (the kernel: exact int8 -> float)

``quantize_model(model)`` replaces, in place, every plain ``nn.Linear`` (lm_head included) with an
:class:`Int8Linear` and an embedding tied to a quantized linear with an :class:`Int8Embedding`
reading the same int8 tensor and scales (one copy: embedding rows are the vocabulary projection's
output channels). The float32 weights are dropped, so the model holds ~1/4 of the linear bytes.
Both stay ``isinstance`` of ``nn.Linear`` / ``nn.Embedding`` so adapters target them as before; a
``weight`` read gives the dequantized matrix (a temporary; DoRA norms at load time use it). Merging
an adapter into an int8 base is refused (``merging.py``): W0 + BA is not representable at the same
scales.

``load_base(dtype="int8")`` loads float32 and quantizes; ``loramux serve --base-dtype int8``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from loramux import dense_kernel

logger = logging.getLogger(__name__)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)) of a (N, K) weight, per output channel, symmetric."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0                                   # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q.contiguous(), scale.contiguous()


def _dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]                                     # (N, K) float32, a temporary


class _Int8Weight:
    """``weight`` as a read-only, dequantized view for code that inspects it (shape, dtype, DoRA norms)."""

    is_quantized = True

    @property
    def compute_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """What ``layers.weight_dtype_device`` reads: float32 on the int8 tensor's device, no dequantization."""
        return self.wscale.dtype, self.qweight.device

    @property
    def weight(self) -> torch.Tensor:
        return _dequantized(self.qweight, self.wscale)

    @weight.setter
    def weight(self, value) -> None:
        raise TypeError(f"{type(self).__name__}: the weight of an int8 base layer cannot be assigned (it is stored as int8 "
                        "with per-channel scales); load the base in float32 to modify its weights")


class Int8Linear(_Int8Weight, nn.Linear):
    """``nn.Linear`` with int8 weights and per-output-channel scales (see the module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel = dense_kernel.load()
        if kernel is not None:
            return kernel.int8_linear(input, self.qweight, self.wscale, self.bias, dense_kernel.MAX_ROWS)
        return F.linear(input, _dequantized(self.qweight, self.wscale).to(input.dtype), self.bias)


class Int8Embedding(_Int8Weight, nn.Embedding):
    """``nn.Embedding`` over int8 rows with per-row scales (shared with a tied, quantized vocabulary projection)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # ids (...) -> (..., d): gather int8 rows, then scale each by its row's scale
        rows = F.embedding(input, self.qweight, self.padding_idx)
        return rows.float() * self.wscale[input].unsqueeze(-1)


def _convert(module: nn.Module, cls: type, q: torch.Tensor, scale: torch.Tensor) -> None:
    del module._parameters["weight"]
    module.__class__ = cls
    module.register_buffer("qweight", q)
    module.register_buffer("wscale", scale)


def quantize_model(model: nn.Module) -> int:
    """Quantize every plain float ``nn.Linear`` of ``model`` in place (and embeddings tied to one); returns the count.

    Refuses nothing silently: layers that are not plain ``nn.Linear`` (already wrapped, Conv1D) stay float.
    """
    embeddings = {id(m.weight): m for m in model.modules() if type(m) is nn.Embedding}
    linears = [m for m in model.modules() if type(m) in (nn.Linear, dense_kernel.DecodeLinear) and m.weight.is_floating_point()]
    done = 0
    for module in linears:
        shared = embeddings.pop(id(module.weight), None)  # tied: the embedding reads the same int8 rows
        q, scale = quantize_weight(module.weight)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
        _convert(module, Int8Linear, q, scale)
        if shared is not None:
            _convert(shared, Int8Embedding, q, scale)
        done += 1
    logger.info("quantized %d linear layers to int8 (per-output-channel scales)", done)
    return done


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, "is_quantized", False)
