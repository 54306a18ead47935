"""b_scaling: B scaled and transposed a group at a time, bit for bit what one module at a time gives."""
from __future__ import annotations

import pytest
import torch

from loramux import b_scaling
from loramux.b_scaling import scaled_transposed


def _reference(B, scaling):
    """The per-module computation loading.py did before: (r, d_out) float32, contiguous."""
    return torch.mul(B.T, scaling, out=torch.empty(B.shape[1], B.shape[0], dtype=torch.float32))


def _interleaved_buffer(layers=5, seed=0):
    """A file-like buffer: per layer A/B of q (d_out 6) and o (d_out 6, same shape as q) and up (d_out 10),
    r=3, layer blocks of equal size, as an adapter file lays them out (q, o interleaved)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [("A", (3, 4)), ("B", (6, 3)), ("A", (3, 4)), ("B", (6, 3)), ("A", (3, 4)), ("B", (10, 3))]
    kinds = ["q", "q", "o", "o", "up", "up"]
    block = sum(a * b for _, (a, b) in shapes)
    buf = torch.randn(layers * block, generator=g)
    items, others, off = [], [], 0
    for layer in range(layers):
        for (role, (a, b)), kind in zip(shapes, kinds):
            t = buf[off: off + a * b].view(a, b)
            off += a * b
            (items if role == "B" else others).append((f"model.layers.{layer}.{kind}", t))
    return buf, items, others


@pytest.mark.parametrize("in_place", [False, True])
def test_groups_equal_the_per_module_reference_bit_for_bit(in_place):
    buf, items, others = _interleaved_buffer()
    scalings = {"q": 2.0, "o": 0.37, "up": 2.0}  # q and o: same shape, different scaling; q and up: same scaling
    Bs = [(name, B, scalings[name.rsplit(".", 1)[1]]) for name, B in items]
    expected = [_reference(B.clone(), s) for _, B, s in Bs]
    others_before = [t.clone() for _, t in others]
    buf_before = buf.clone()
    out, stacks = scaled_transposed(Bs, in_place=in_place)
    for got, want in zip(out, expected):
        assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == want.shape
        assert torch.equal(got, want)
    assert len(stacks) == 3  # one (layers, r, d_out) result per kind: q, o, up
    assert sum(s.numel() for s in stacks) == sum(t.numel() for t in out)
    for (_, t), before in zip(others, others_before):  # the A between them are never touched
        assert torch.equal(t, before)
    if in_place:  # written over the B's own bytes
        ptr = buf.untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == ptr for t in out)
        assert all(t.data_ptr() == B.data_ptr() for t, (_, B, _) in zip(out, Bs))
    else:  # the inputs are left as they were
        assert torch.equal(buf, buf_before)
        assert all(t.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() for t in out)


def test_non_contiguous_half_and_separate_tensors():
    g = torch.Generator().manual_seed(1)
    Bs = [("m.0.a", torch.randn(3, 7, generator=g).T, 1.5),                 # non-contiguous (7, 3)
          ("m.1.a", torch.randn(7, 3, generator=g).half(), 1.5),            # float16: cast the same way
          ("m.2.a", torch.randn(7, 3, generator=g).bfloat16(), 1.5),
          ("m.3.a", torch.randn(7, 3, generator=g), 1.5),                   # own storages, not one buffer
          ("m.4.a", torch.randn(7, 3, generator=g), 1.5)]
    before = [B.clone() for _, B, _ in Bs]
    out, _ = scaled_transposed(Bs, in_place=True)
    for (_, B, s), got, orig in zip(Bs, out, before):
        assert torch.equal(got, _reference(orig, s))
        assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(Bs[1][1], before[1]) and torch.equal(Bs[2][1], before[2])  # not float32: never overwritten


def test_shared_bytes_are_never_a_run():
    """Two B at the same offset (aliases) or overlapping are not taken for an equally spaced run."""
    buf = torch.randn(40)
    a, b, c = buf[:12].view(4, 3), buf[:12].view(4, 3), buf[6:18].view(4, 3)
    runs = b_scaling._runs([(0, a), (1, b), (2, c)])
    assert all(len(idx) == 1 for idx, _ in runs)


def test_runs_are_chunked(monkeypatch):
    """Long runs go CHUNK_BYTES at a time, still bit-identical."""
    monkeypatch.setattr(b_scaling, "CHUNK_BYTES", 2 * 6 * 3 * 4)  # two B per chunk
    buf, items, _ = _interleaved_buffer(layers=7, seed=3)
    Bs = [(name, B, 0.5) for name, B in items]
    expected = [_reference(B.clone(), s) for _, B, s in Bs]
    out, stacks = scaled_transposed(Bs, in_place=True)
    assert all(torch.equal(g, w) for g, w in zip(out, expected))
    assert max(s.shape[0] for s in stacks) == 2


@pytest.mark.parametrize("scaling", [1 / 3, 2.0, 0.37, 1e-7, 3e29, 16 / 8 ** 0.5, 123456.789])
def test_float32_path_rounds_like_torch_mul(scaling):
    """The numpy fast path (float32) multiplies by float32(scaling), exactly what torch.mul does."""
    g = torch.Generator().manual_seed(7)
    buf = torch.randn(6 * 700 * 8, generator=g) * 10
    Bs = [(f"l.{i}.q", buf[i * 5600: (i + 1) * 5600].view(700, 8), scaling) for i in range(6)]
    expected = [_reference(B.clone(), scaling) for _, B, _ in Bs]
    out, _ = scaled_transposed(Bs, in_place=False)
    assert all(torch.equal(o, e) for o, e in zip(out, expected))

