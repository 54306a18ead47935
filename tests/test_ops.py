"""The grouped fast path equals the row-by-row reference, for every kind of group and weight."""
from __future__ import annotations

import pytest
import torch

from loramux.mapping import BASE_SLOT, BatchMapping
from loramux.ops import apply_lora, lora_delta_reference
from loramux.slots import SlotTable, SlotWeights

D_IN, D_OUT, T = 12, 10, 5


def _table(seed: int, embedding: bool = False, dora: bool = False, bias: bool = False) -> SlotTable:
    g = torch.Generator().manual_seed(seed)
    table = SlotTable()
    for slot, rank in [(0, 2), (1, 4), (3, 8)]:  # slot 2 empty: an adapter that skips this layer
        A = torch.randn((D_IN, rank) if embedding else (rank, D_IN), generator=g)
        table.write(slot, SlotWeights(
            A=A, B=torch.randn(D_OUT, rank, generator=g),
            bias=torch.randn(D_OUT, generator=g) if bias else None,
            dora_scale=(1 + torch.rand(D_OUT, generator=g)) if dora else None))
    return table


ROWS = [
    (0, 0, 0),                    # one adapter covers the batch
    (0, 1, BASE_SLOT, 3),         # all distinct
    (1, 1, 3, 3, 0, BASE_SLOT),   # contiguous groups (slices)
    (1, 3, 1, 2, 3, 1),           # scattered groups (index tensors) and an uncovered slot
    (BASE_SLOT, BASE_SLOT),       # nothing to do
]


@pytest.mark.parametrize("row_slots", ROWS)
@pytest.mark.parametrize("kind", ["linear", "dora", "bias", "embedding"])
def test_apply_lora_equals_reference(row_slots, kind):
    embedding = kind == "embedding"
    table = _table(len(row_slots), embedding=embedding, dora=kind == "dora", bias=kind == "bias")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, D_IN, (len(row_slots), T), generator=g) if embedding else torch.randn(len(row_slots), T, D_IN, generator=g)
    y0 = torch.randn(len(row_slots), T, D_OUT, generator=g)
    base_bias = torch.randn(D_OUT, generator=g) if kind == "dora" else None
    expected = lora_delta_reference(x, y0, table, row_slots, embedding, base_bias)
    got = apply_lora(y0.clone(), x, table, BatchMapping(row_slots), embedding, base_bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if any(s in (0, 1, 3) for s in row_slots):
        assert not torch.allclose(expected, y0)


def test_groups_are_slices_when_contiguous_and_built_once():
    mapping = BatchMapping((1, 1, 3, 3, 0))
    groups = mapping.groups(torch.device("cpu"))
    assert [(g.slot, g.rows) for g in groups] == [(1, slice(0, 2)), (3, slice(2, 4)), (0, slice(4, 5))]
    assert mapping.groups(torch.device("cpu")) is groups
    scattered = BatchMapping((1, 3, 1)).groups(torch.device("cpu"))
    assert scattered[0].rows.tolist() == [0, 2]


def test_rows_expanded_for_beams_follow_their_request():
    mapping = BatchMapping((1, BASE_SLOT))
    assert mapping.for_rows(6).row_slots == (1, 1, 1, BASE_SLOT, BASE_SLOT, BASE_SLOT)
    with pytest.raises(ValueError, match="5 rows but adapter_names has 2 entries"):
        mapping.for_rows(5)
