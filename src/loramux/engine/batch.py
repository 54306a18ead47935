"""The decode batch: its rows (sequences), their KV cache, and their routing, kept in step.

One object owns all three, so they cannot drift apart: a sequence joins with its prefilled KV row
(placed next to the rows of its adapter, ``grouped_rows``) and leaves with it, and the routing the
model needs for a forward over these rows is prepared then, on join and leave only, not in every
decode step. Engine thread only.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from loramux.engine import grouped_rows
from loramux.engine import kv as kvops


class DecodeBatch:
    """Rows of the running batch. ``prepare(loads)`` turns the rows' adapter loads (pinned by their
    requests; None = base) into the routing handed to the model's forward (``routing``: slots, no
    names), rebuilt whenever the rows change."""

    def __init__(self, prepare: Callable[[list[Any]], Any]) -> None:
        self._prepare = prepare
        self.rows: list[Any] = []  # row order == KV row order
        self.kv: kvops.RowsKV | None = None
        self.routing: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def nbytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    def join(self, seq: Any, part: kvops.RowsKV) -> None:
        """Add a sequence whose prompt KV (one unpadded row) is ``part``; the batch takes ``part`` over."""
        if self.kv is None:
            self.kv = kvops.RowsKV()
        grouped_rows.append(self.rows, self.kv, seq, part)
        self._reroute()

    def leave(self, gone: Sequence[Any]) -> None:
        """Remove rows (finished, cancelled, failed); the KV cache is freed when none are left."""
        if not gone or self.kv is None:
            return
        grouped_rows.remove(self.rows, self.kv, list(gone))
        if not self.rows:
            self.kv = None
        self._reroute()

    def clear(self) -> None:
        """Forget every row (after a failed forward left the KV cache half-updated)."""
        self.rows, self.kv, self.routing = [], None, None

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The next decode step's input ids and positions, both (B, 1): each row's last token at its length
        (a row that joined with all but its last prompt token in its KV is fed that token, ``step.py``)."""
        last = torch.tensor([[s.output_ids[-1] if s.output_ids else s.req.prompt_ids[-1]] for s in self.rows],
                            device=device)  # (B, 1)
        pos = torch.tensor([[n] for n in self.kv.lengths], device=device)  # (B, 1): real tokens so far
        return last, pos

    def _reroute(self) -> None:
        self.routing = self._prepare([s.load for s in self.rows]) if self.rows else None
