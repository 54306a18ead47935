"""The per-row token-mask hook (structured outputs, grammars): ``SamplingParams(constraint=factory)``.

``factory()`` is called once per sequence (so each of ``n`` sequences has its own state). Before a
token is chosen the engine asks ``allowed(vocab_size)`` for a ``(V,)`` bool mask (True = may be
sampled), applies it after ``logit_bias`` and before temperature/top-k/top-p, picks, then calls
``accept(token)``; when ``is_finished()`` turns True the sequence ends with finish reason ``stop``.
Rows without a constraint pay nothing. Any exception from the object (or a mask of the wrong shape,
or one that allows nothing) fails that request alone (``FailureKind.ROW_FAILED``).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from loramux.engine.failures import RowFailed


@runtime_checkable
class TokenConstraint(Protocol):
    def allowed(self, vocab_size: int) -> torch.Tensor:
        """(V,) bool: True where the token may be sampled next."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance the constraint's state after ``token_id`` was chosen."""
        ...

    def is_finished(self) -> bool:
        """True when the constrained output is complete (the sequence stops with reason ``stop``)."""
        ...


NO_TOKEN_ALLOWED = "constraint.allowed() allows no token at all"


def checked_mask(constraint: TokenConstraint, vocab_size: int, device: torch.device,
                 require_any: bool = True) -> torch.Tensor:
    """The constraint's mask, checked: (V,) bool on ``device`` (with at least one True unless the caller
    checks that itself for several rows at once: ``require_any=False``)."""
    mask = constraint.allowed(vocab_size)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (vocab_size,):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise RowFailed(f"constraint.allowed() must return a ({vocab_size},) bool tensor, got {got}")
    if require_any and not bool(mask.any()):
        raise RowFailed(NO_TOKEN_ALLOWED)
    return mask.to(device)
