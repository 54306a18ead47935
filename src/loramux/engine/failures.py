"""Why a request did not finish normally, as data: ``Failure(kind, message)`` on its final output.

Callers branch on ``failure.kind`` (an enum), never on the message; ``RequestOutput.error`` keeps the
message for display. Inside the engine a row-level fault is raised as ``RowFailed`` and caught at the
row, so it fails that request only.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class FailureKind(str, enum.Enum):
    """What went wrong; the value is a stable lowercase string (for logs, metrics and HTTP codes)."""

    ADAPTER_LOAD_FAILED = "adapter_load_failed"  # the adapter could not be read, did not fit, or vanished
    UNKNOWN_ADAPTER = "unknown_adapter"          # the adapter is not known (any more)
    INVALID_REQUEST = "invalid_request"          # a parameter that only the engine could check failed late
    ROW_FAILED = "row_failed"                    # this row's own computation: sampling, NaN logits, stop/detok, constraint
    MODEL_ERROR = "model_error"                  # the shared forward pass failed (every row in it fails)
    ABORTED = "aborted"                          # cancelled by the caller or by shutdown(abort=True)


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


class RowFailed(Exception):
    """Raised inside the engine for a fault confined to one row; caught at the row, fails that request."""

    def __init__(self, message: str, kind: FailureKind = FailureKind.ROW_FAILED) -> None:
        super().__init__(message)
        self.kind = kind


def describe(exc: BaseException) -> str:
    """``"Type: message"``: the display form of an exception (kept as ``RequestOutput.error``)."""
    return f"{type(exc).__name__}: {exc}"
