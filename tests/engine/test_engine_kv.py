"""RowsKV: joins, decode steps and removals keep every row's keys in order, left-padded with zeros."""
from __future__ import annotations

import random

import pytest
import torch

from loramux.engine.kv import RowsKV

H, D, LAYERS = 2, 3, 2


def _feed(kv: RowsKV, values: torch.Tensor) -> None:
    """One 'forward': values (B, T) become the keys (and minus the values) of T new tokens in every layer."""
    kv.extend_mask(values.shape[1], values.device)
    k = values[:, None, :, None].expand(-1, H, -1, D).float()  # (B, H, T, D)
    for layer in range(LAYERS):
        kv.update(k + layer, -(k + layer), layer)


def _check(kv: RowsKV, seqs: list[int], tokens: dict[int, list[float]]) -> None:
    assert kv.rows == len(seqs) == kv.mask.shape[0]
    for layer_idx, layer in enumerate(kv.layers):
        keys, values = layer.keys, layer.values  # what attention would read: (B, H, width, D)
        assert keys.shape == (kv.rows, H, kv.width, D) and layer.get_seq_length() == kv.width
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()
        for row, seq in enumerate(seqs):
            real = kv.mask[row].bool()
            assert int(real.sum()) == kv.lengths[row] == len(tokens[seq])
            assert not real[: kv.width - kv.lengths[row]].any()  # left padding only
            want = torch.tensor(tokens[seq]) + layer_idx
            assert torch.equal(keys[row, 0, real, 0], want) and torch.equal(values[row, 1, real, 2], -want)
            assert (keys[row, :, ~real] == 0).all()
    if kv.rows:  # the window is trimmed: some row starts at column 0
        assert kv.mask[:, 0].any()


def test_random_joins_steps_and_removals_keep_rows_intact():
    rng = random.Random(0)
    batch, seqs, tokens, next_id = RowsKV(), [], {}, 0
    for _ in range(120):
        op = rng.random()
        if op < 0.3 or not seqs:  # a sequence joins, prefilled in 1-2 chunks
            n = rng.randrange(1, 40)
            seq, next_id = next_id, next_id + 1
            tokens[seq] = [seq * 1000.0 + j for j in range(n)]
            part = RowsKV()
            part.begin(1)
            cut = rng.randrange(1, n + 1)
            _feed(part, torch.tensor([tokens[seq][:cut]]))
            if cut < n:
                _feed(part, torch.tensor([tokens[seq][cut:]]))
            batch.add(part)
            seqs.append(seq)
        elif 0.45 <= op < 0.55 and len(seqs) > 1:  # rows rotate (a cycle over a few of them)
            picked = rng.sample(range(len(seqs)), rng.randrange(2, len(seqs) + 1))
            batch.permute(picked[1:] + picked[:1], picked)
            moved = [seqs[i] for i in picked]
            for i, seq in zip(picked[1:] + picked[:1], moved):
                seqs[i] = seq
        elif op < 0.45:  # some sequences leave
            gone = rng.sample(range(len(seqs)), rng.randrange(1, len(seqs) + 1))
            order = batch.remove(gone)
            assert sorted(order) == sorted(set(range(len(seqs))) - set(gone))
            seqs = [seqs[j] for j in order]
            if not seqs:
                batch = RowsKV()
                continue
        else:  # a decode step: one token per row
            new = [seq * 1000.0 + len(tokens[seq]) for seq in seqs]
            for seq, value in zip(seqs, new):
                tokens[seq].append(value)
            _feed(batch, torch.tensor(new)[:, None])
        _check(batch, seqs, tokens)


def test_buffers_shrink_when_rows_leave():
    batch = RowsKV()
    for i in range(16):
        part = RowsKV()
        part.begin(1)
        _feed(part, torch.arange(200.0)[None] + 1000 * i)
        batch.add(part)
    big = batch.nbytes()
    batch.remove(list(range(15)))
    assert batch.rows == 1 and batch.nbytes() < big / 2


def test_from_cache_copies_a_transformers_cache_and_crop_drops_the_newest_columns():
    from transformers import DynamicCache

    cache = DynamicCache()
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(3, H, 5, D, generator=g), torch.randn(3, H, 5, D, generator=g)) for _ in range(LAYERS)]
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    kv = RowsKV.from_cache(cache)
    assert kv.rows == 3 and kv.width == 5 and kv.lengths == [5, 5, 5] and bool(kv.mask.all())
    for layer, (k, v) in zip(kv.layers, layers):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
        assert layer.keys.data_ptr() != k.data_ptr()  # a copy
    _feed(kv, torch.tensor([[7.0, 8.0], [7.0, 8.0], [7.0, 8.0]]))
    assert kv.width == 7 and kv.get_seq_length() == 7
    kv.crop(-2)
    assert kv.width == 5 and kv.get_seq_length() == 5 and kv.lengths == [5, 5, 5]
    for layer, (k, v) in zip(kv.layers, layers):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    kv.crop(4)  # a positive value keeps that many (transformers' legacy meaning)
    assert kv.width == 4 and kv.layers[0].keys.shape[2] == 4



def test_a_join_that_grows_the_buffers_leaves_room_for_the_next_decode_columns():
    """When ``add`` re-lays the buffers (the rows or the left padding outgrew them), the columns after the
    window get headroom too: else the next decode step finds no room (``decode_columns`` None) and takes
    the layer-by-layer path while the buffers are re-laid again."""
    batch, relaid = RowsKV(), 0
    for n, length in enumerate((3, 9, 20, 40, 7, 70, 5, 120)):  # more rows, longer windows: both kinds of re-lay
        before = [layer.buf_k for layer in batch.layers]
        part = RowsKV()
        part.begin(1)
        _feed(part, torch.arange(length, dtype=torch.float32)[None] + 100 * n)
        batch.add(part)
        if before and not all(layer.buf_k is buf for layer, buf in zip(batch.layers, before)):
            relaid += 1
            bufs = [layer.buf_k for layer in batch.layers]
            for _ in range(32):  # 32 decode columns in place: no re-lay until then
                assert batch.decode_columns(batch.rows) is not None
                _feed(batch, torch.zeros(batch.rows, 1))
                assert all(layer.buf_k is buf for layer, buf in zip(batch.layers, bufs))
        else:
            _feed(batch, torch.zeros(batch.rows, 1))
    assert relaid >= 3


def test_a_decode_column_written_in_place_shows_in_keys_after_advance_and_assignment_is_refused():
    """``decode_stack`` writes column ``end`` of the buffers itself and calls ``advance``: the layers' ``keys`` /
    ``values`` (sliced when read) then include that column, as after ``update``; assigning them is refused,
    since the buffers are the state (transformers' beam reordering would otherwise bypass them)."""
    kv = RowsKV()
    kv.begin(2)
    _feed(kv, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    before = [layer.keys.clone() for layer in kv.layers]
    buf_k, buf_v, start, end = kv.decode_columns(2)
    for i, (bk, bv) in enumerate(zip(buf_k, buf_v)):
        bk[:2, :, end] = 10.0 + i
        bv[:2, :, end] = -10.0 - i
    kv.extend_mask(1, torch.device("cpu"))
    kv.advance()
    for i, layer in enumerate(kv.layers):
        assert layer.keys.shape == (2, H, 3, D) and layer.get_seq_length() == 3 == kv.width
        assert torch.equal(layer.keys[:, :, :2], before[i]) and (layer.keys[:, :, 2] == 10.0 + i).all()
        assert (layer.values[:, :, 2] == -10.0 - i).all()
    _check(kv, [0, 1], {0: [1.0, 2.0, 10.0], 1: [3.0, 4.0, 10.0]})
    for field in ("keys", "values"):
        with pytest.raises(NotImplementedError, match="keeps its keys and values in its buffers"):
            setattr(kv.layers[0], field, torch.zeros(2, H, 3, D))
    assert kv.layers[0].keys.shape == (2, H, 3, D) and (kv.layers[0].keys[:, :, 2] == 10.0).all()  # unchanged
