"""The compiled grouped-LoRA CPU kernel: same results as the reference, independent of the batch,
used where it should be, and a clean fallback when it is off or cannot build."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from loramux import cpu_kernel, ops
from loramux.mapping import BASE_SLOT, BatchMapping
from loramux.ops import apply_lora, lora_delta_reference
from loramux.slots import SlotTable, SlotWeights

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernel.load()
    if module is None:
        if HAS_COMPILER and cpu_kernel.enabled():
            pytest.fail("a C++ compiler is here but the grouped-LoRA kernel did not build (see the warning log)")
        pytest.skip("no C++ compiler (or LORAMUX_CPU_KERNEL=0): the torch path is tested elsewhere")
    return module


def _table(d_in: int, d_out: int, ranks: dict[int, int], seed: int = 0) -> SlotTable:
    g = torch.Generator().manual_seed(seed)
    table = SlotTable()
    for slot, rank in ranks.items():
        table.write(slot, SlotWeights(A=torch.randn(rank, d_in, generator=g), B=torch.randn(d_out, rank, generator=g)))
    return table


# (d_in, d_out): multiples of 16, of 8 only, neither (the vector loops' tails), below one vector
SHAPES = [(64, 48), (24, 40), (37, 13), (5, 3), (576, 1536)]
# ranks: 1, not a multiple of 4 (the expand loop's tail), 8, 64
RANKS = {0: 1, 1: 3, 2: 8, 4: 64, 5: 13}
ROWS = [
    (0, 1, 2, 4, 5),                                  # one token per adapter
    (4, 4, 4, 2, BASE_SLOT, 1, 1, 5, 5, 5, 5, 0),    # contiguous groups and a base row
    (5, 2, 5, 4, 2, 4, 3, BASE_SLOT, 5),              # scattered groups, slot 3 not in this layer
    (2,) * 20,                                        # one adapter covers the batch
]


@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("row_slots", ROWS)
def test_decode_step_equals_reference(kernel, d_in, d_out, row_slots):
    table = _table(d_in, d_out, RANKS, seed=d_in)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(row_slots), 1, d_in, generator=g)       # (B, T=1, d_in): a decode step
    y0 = torch.randn(len(row_slots), 1, d_out, generator=g)
    expected = lora_delta_reference(x, y0, table, row_slots)
    got = apply_lora(y0.clone(), x, table, BatchMapping(row_slots))
    # float32 rounding in another summation order: relative to the outputs' magnitude
    torch.testing.assert_close(got, expected, atol=1e-6 * expected.abs().max().item(), rtol=1e-5)
    assert not torch.allclose(expected, y0)


def test_a_tokens_result_does_not_depend_on_the_batch_or_threads(kernel):
    """Bit for bit: the engine's 'mixed equals alone' guarantee rests on this."""
    d_in, d_out = 576, 1536
    table = _table(d_in, d_out, RANKS)
    row_slots = (4, 4, 0, 5, 5, 5, 2, 1, BASE_SLOT, 4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(row_slots), 1, d_in, generator=g)
    y0 = torch.randn(len(row_slots), 1, d_out, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            results.append(apply_lora(y0.clone(), x, table, BatchMapping(row_slots)))
        assert torch.equal(results[0], results[1])
        for b, slot in enumerate(row_slots):
            alone = apply_lora(y0[b:b + 1].clone(), x[b:b + 1], table, BatchMapping((slot,)))
            assert torch.equal(alone[0], results[1][b]), f"row {b} (slot {slot}) differs when batched"
    finally:
        torch.set_num_threads(threads)


def test_decode_uses_the_kernel_and_prefill_the_rows_call_on_several_threads(kernel, monkeypatch):
    calls, rows_calls = [], []

    class Counting:
        @staticmethod
        def grouped_lora_add(*args):
            calls.append(len(args[3]))
            return kernel.grouped_lora_add(*args)

        @staticmethod
        def grouped_lora_add_rows(*args):
            rows_calls.append(len(args[2]))
            return kernel.grouped_lora_add_rows(*args)

    monkeypatch.setattr(cpu_kernel, "load", lambda: Counting)
    table = _table(16, 8, RANKS)
    mapping = BatchMapping((0, 1, 1, BASE_SLOT))
    apply_lora(torch.zeros(4, 1, 8), torch.randn(4, 1, 16), table, mapping)
    assert calls == [2] and rows_calls == []  # one call for both groups of the layer
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # prefill on one thread: torch's calls, group after group
        apply_lora(torch.zeros(4, 7, 8), torch.randn(4, 7, 16), table, mapping)  # 7 tokens per row
        assert calls == [2] and rows_calls == []
        torch.set_num_threads(2)  # the groups spread over the threads, in one call
        apply_lora(torch.zeros(4, 7, 8), torch.randn(4, 7, 16), table, mapping)
        assert calls == [2] and rows_calls == [2]
        apply_lora(torch.zeros(4, 7, 8), torch.randn(4, 7, 16), table, BatchMapping((1, 1, BASE_SLOT, BASE_SLOT)))
        assert rows_calls == [2]  # a single group keeps MKL's own threading
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("inference", [False, True])
def test_prefill_rows_call_equals_the_torch_path_bit_for_bit(kernel, inference):
    """Prefill on 2 threads (groups spread over the threads, the largest halved) against 1 thread (torch's
    calls one group after another): the same MKL calls per row, so the same bits; DoRA, bias, scattered and
    base rows in the same layer take the torch path either way."""
    d_in, d_out, T = 576, 1536, 64
    table = _table(d_in, d_out, {0: 8, 1: 64, 2: 16, 4: 3})
    g = torch.Generator().manual_seed(5)
    table.write(5, SlotWeights(A=torch.randn(4, d_in, generator=g), B=torch.randn(d_out, 4, generator=g),
                               dora_scale=1 + torch.rand(d_out, generator=g)))
    # slot 1's 4 rows (256 tokens, rank 64) cost more than a thread's share: halved; slot 4 is scattered
    row_slots = (0, 1, 1, 1, 1, 4, 2, 2, BASE_SLOT, 4, 5, 3)
    x = torch.randn(len(row_slots), T, d_in, generator=g)
    y0 = torch.randn(len(row_slots), T, d_out, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            with torch.inference_mode(inference):
                xi, yi = (x.clone(), y0.clone()) if inference else (x, y0.clone())
                results.append(apply_lora(yi, xi, table, BatchMapping(row_slots)).clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    expected = lora_delta_reference(x, y0, table, row_slots)
    torch.testing.assert_close(results[1], expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
    assert torch.equal(results[1][8], y0[8]) and not torch.allclose(results[1][1], y0[1])


def test_rows_call_rejects_bad_ranges_before_writing(kernel):
    y, x = torch.zeros(4, 8), torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="bad token range"):
        kernel.grouped_lora_add_rows(y, x, [0, 2], [2, 5], [torch.randn(4, 16)] * 2, [torch.randn(4, 8)] * 2)
    with pytest.raises(RuntimeError, match=r"B_t\[1\] must be float32 \(4, 8\)"):
        kernel.grouped_lora_add_rows(y, x, [0, 2], [2, 4], [torch.randn(4, 16)] * 2, [torch.randn(4, 8), torch.randn(4, 9)])
    assert torch.equal(y, torch.zeros(4, 8))


def test_dora_and_bias_groups_take_the_torch_path_in_the_same_layer(kernel):
    g = torch.Generator().manual_seed(3)
    table = _table(16, 8, {0: 4, 1: 8})
    table.write(2, SlotWeights(A=torch.randn(4, 16, generator=g), B=torch.randn(8, 4, generator=g),
                               dora_scale=1 + torch.rand(8, generator=g)))
    table.write(3, SlotWeights(A=torch.randn(2, 16, generator=g), B=torch.randn(8, 2, generator=g),
                               bias=torch.randn(8, generator=g)))
    row_slots = (0, 2, 3, 1, 3)
    x, y0 = torch.randn(5, 1, 16, generator=g), torch.randn(5, 1, 8, generator=g)
    expected = lora_delta_reference(x, y0, table, row_slots)
    torch.testing.assert_close(apply_lora(y0.clone(), x, table, BatchMapping(row_slots)), expected, atol=1e-5, rtol=1e-5)


def test_kernel_rejects_mismatched_shapes_with_a_clear_error(kernel):
    y, x = torch.zeros(2, 8), torch.randn(2, 16)
    with pytest.raises(RuntimeError, match=r"B_t\[0\] must be contiguous float32 \(4, 8\)"):
        kernel.grouped_lora_add(y, x, torch.arange(2), [0], [2], [torch.randn(4, 16)], [torch.randn(4, 9)])
    with pytest.raises(RuntimeError, match="token out of range"):
        kernel.grouped_lora_add(y, x, torch.tensor([0, 5]), [0], [2], [torch.randn(4, 16)], [torch.randn(4, 8)])
    assert torch.equal(y, torch.zeros(2, 8))  # refused before writing anything


def test_switched_off_the_torch_path_gives_the_same_results(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    monkeypatch.setattr(cpu_kernel, "_state", {})  # the switch is read once per process: start afresh
    assert cpu_kernel.load() is None
    table = _table(24, 40, RANKS)
    row_slots = ROWS[2]
    g = torch.Generator().manual_seed(4)
    x, y0 = torch.randn(len(row_slots), 1, 24, generator=g), torch.randn(len(row_slots), 1, 40, generator=g)
    torch.testing.assert_close(apply_lora(y0.clone(), x, table, BatchMapping(row_slots)),
                               lora_delta_reference(x, y0, table, row_slots), atol=1e-5, rtol=1e-5)


def test_a_failed_build_is_logged_once_and_falls_back(monkeypatch, caplog):
    from torch.utils import cpp_extension

    attempts = []

    def broken(**kwargs):
        attempts.append(kwargs["name"])
        raise RuntimeError("Error building extension 'x': [1/2] c++ -MMD ...\nFAILED: [code=127] grouped_lora.o\n"
                           "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.")

    saved = dict(cpu_kernel._state)
    monkeypatch.setattr(cpp_extension, "load", broken)
    cpu_kernel._reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING, logger="loramux.cpu_kernel"):
            assert cpu_kernel.load() is None
            assert cpu_kernel.load() is None
        assert len(attempts) == 1
        assert "(RuntimeError: /bin/sh: 1: c++: not found)" in caplog.text and "LORAMUX_CPU_KERNEL=0" in caplog.text
        table = _table(16, 8, {0: 4})
        x, y0 = torch.randn(2, 1, 16), torch.randn(2, 1, 8)
        torch.testing.assert_close(apply_lora(y0.clone(), x, table, BatchMapping((0, 0))),
                                   lora_delta_reference(x, y0, table, (0, 0)), atol=1e-5, rtol=1e-5)
    finally:
        cpu_kernel._state.clear()
        cpu_kernel._state.update(saved)


def test_slot_weights_keep_B_transposed_contiguous():
    w = SlotWeights(A=torch.randn(4, 16), B=torch.randn(8, 4))
    assert w.B.shape == (8, 4) and w.B_t.is_contiguous() and w.A.is_contiguous()
    assert ops.KERNEL_MAX_ROW_TOKENS >= 1


def test_a_lock_file_left_by_a_killed_build_is_removed_not_waited_on(tmp_path):
    """torch's builder waits forever on a ``lock`` file; one left by a killed build must not hang every later
    start. Under loramux's flock no other build can be running, so the file is known to be stale."""
    from loramux.cpu_kernel import _build_lock

    (tmp_path / "lock").write_text("")
    with _build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    with _build_lock(tmp_path):  # re-entrant across calls: the flock is released on exit
        pass
