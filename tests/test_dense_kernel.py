"""The decode GEMM kernel for the base model's linears: same results as F.linear over odd shapes, a row's
result independent of the batch and of the thread count, the whole model within fp32 tolerance of plain
transformers, and the untouched torch path when it is off or cannot build."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loramux import cpu_kernel, dense_kernel, one_row_tiles
from loramux.dense_kernel import DecodeLinear

from lora_fixtures import tiny_llama


@pytest.fixture
def kernel(decode_gemm_kernel):  # tests/conftest.py: built once, fails (not skips) where it should build
    return decode_gemm_kernel


@pytest.fixture(params=[False, True], ids=["8-row", "2-row"])
def one_row_shape(request, kernel):
    """Each of float32's one-row tile shapes (one_row_tiles.py), the process's own restored afterwards."""
    saved = kernel.one_row_shape()
    kernel.set_one_row_shape(request.param)
    yield request.param
    kernel.set_one_row_shape(saved)


def _tolerance(x: torch.Tensor, w: torch.Tensor) -> float:
    # fp32 rounding in another summation order grows with K and the magnitude of the products
    return 4e-7 * x.shape[-1] ** 0.5 * (x.abs().max() * w.abs().max()).item() * 8


# (d_out, d_in): multiples of the vector widths, of 8 only, neither, below one vector; and the
# default model's shapes (K 576 and 1536, N 192 and a tile tail)
SHAPES = [(64, 64), (40, 24), (13, 37), (3, 5), (1, 7), (192, 576), (577, 1536), (6, 129)]


@pytest.mark.parametrize("d_out,d_in", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_f_linear(kernel, d_out, d_in, bias):
    g = torch.Generator().manual_seed(d_out * 1000 + d_in)
    w = torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 17, 32, 33):
        x = torch.randn(m, d_in, generator=g)
        got = kernel.decode_linear(x, w, b, 64)
        torch.testing.assert_close(got, F.linear(x, w, b), atol=_tolerance(x, w), rtol=1e-5, msg=f"M={m}")


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_a_group_call_equals_one_call_per_matrix_bit_for_bit(kernel, threads, n_threads, one_row_shape):
    """decode_linear_group (q/k/v, gate/up in one call): each output is what decode_linear gives for that matrix
    alone, bit for bit, over matrices of odd sizes with and without bias, row counts across the tile shapes, and
    the fallbacks (rows above the limit, grad, another dtype) that give F.linear's result."""
    torch.set_num_threads(n_threads)
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(n, 40, generator=g) for n in (24, 7, 64, 1)]
    biases = [torch.randn(24, generator=g), None, torch.randn(64, generator=g), None]
    for m in (1, 2, 3, 5, 16, 17, 64, 65):
        x = torch.randn(m, 1, 40, generator=g)
        got = kernel.decode_linear_group(x, weights, biases, 64)
        assert [y.shape for y in got] == [(m, 1, w.shape[0]) for w in weights]
        for y, w, b in zip(got, weights, biases):
            assert torch.equal(y, kernel.decode_linear(x, w, b, 64)), m
    x = torch.randn(2, 40, generator=g, requires_grad=True)
    got = kernel.decode_linear_group(x, weights, biases, 64)
    assert all(y.requires_grad for y in got)
    torch.testing.assert_close(got[0], F.linear(x, weights[0], biases[0]))
    doubles = [w.double() for w in weights]
    got = kernel.decode_linear_group(x.detach().double(), doubles, [None] * 4, 64)
    assert got[2].dtype == torch.float64
    with pytest.raises(RuntimeError, match="one bias"):
        kernel.decode_linear_group(x, weights, biases[:2], 64)


def test_leading_dims_and_non_contiguous_inputs(kernel):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x = torch.randn(3, 2, 40, generator=g)                     # (B, T, d_in) -> (B, T, d_out)
    assert kernel.decode_linear(x, w, b, 64).shape == (3, 2, 24)
    torch.testing.assert_close(kernel.decode_linear(x, w, b, 64), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    xt = torch.randn(40, 5, generator=g).T                      # non-contiguous (5, 40)
    torch.testing.assert_close(kernel.decode_linear(xt, w, None, 64), F.linear(xt, w), atol=1e-5, rtol=1e-5)


def test_a_rows_result_does_not_depend_on_the_batch_or_threads(kernel, threads, one_row_shape):
    """Bit for bit, as the engine's 'mixed equals alone' guarantee needs, in every tile position (one row has its
    own tile shapes: 8 W rows with tail tiles of 1-7 rows, or 2 with a 1-row tail, and the K tail below one
    vector). Both one-row shapes give a row what the multi-row tiles give it, so they agree with each other."""
    g = torch.Generator().manual_seed(2)
    for d_out, d_in in ((577, 1536), (13, 37)):
        w, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
        x = torch.randn(33, d_in, generator=g)
        results = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = kernel.decode_linear(x, w, b, 64)
            for m in (1, 2, 5, 7, 16, 33):
                assert torch.equal(kernel.decode_linear(x[:m], w, b, 64), results[n][:m]), f"{m} rows, {n} threads"
            for i in (0, 4, 17, 32):
                assert torch.equal(kernel.decode_linear(x[i:i + 1], w, b, 64), results[n][i:i + 1]), f"row {i} alone"
        assert torch.equal(results[1], results[2])


def test_above_max_rows_autograd_and_other_dtypes_take_torch(kernel):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=g)
    x = torch.randn(65, 16, generator=g)
    assert torch.equal(kernel.decode_linear(x, w, None, 64), F.linear(x, w))        # prefill-sized: MKL itself
    wd, xd = w.double(), x[:2].double()
    assert torch.equal(kernel.decode_linear(xd, wd, None, 64), F.linear(xd, wd))
    wg = w.clone().requires_grad_(True)
    out = kernel.decode_linear(x[:2], wg, None, 64)
    out.sum().backward()                                                            # autograd: at::linear
    torch.testing.assert_close(wg.grad, x[:2].sum(0).expand(8, 16))


def test_install_switches_every_linear_without_copying(kernel):
    model = tiny_llama(seed=3)
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert dense_kernel.install(model) == len(linears) > 0
    for name in linears:
        module = model.get_submodule(name)
        assert type(module) is DecodeLinear and isinstance(module, nn.Linear)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == weights   # no copy, no re-layout
    assert dense_kernel.uninstall(model) == len(linears)


def test_tied_lm_head_logits_match_plain_transformers(kernel, threads):
    """The vocabulary projection is tied to the embeddings: it must read the same tensor."""
    from loramux import MultiLoraModel

    plain = tiny_llama(seed=4, tie_word_embeddings=True, vocab_size=203, hidden_size=72, intermediate_size=136)
    lm = MultiLoraModel(copy.deepcopy(plain))
    assert type(lm.base_model.lm_head) is DecodeLinear
    assert lm.base_model.lm_head.weight is lm.base_model.model.embed_tokens.weight
    ids = torch.randint(3, 203, (5, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for n in (1, 2):
            torch.set_num_threads(n)
            expected = plain(input_ids=ids).logits
            got = lm(input_ids=ids).logits                             # 45 rows: the kernel
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
            cache = lm(input_ids=ids[:, :8], use_cache=True).past_key_values
            step = lm(input_ids=ids[:, 8:], past_key_values=cache, use_cache=True).logits   # a 5-row decode step
            torch.testing.assert_close(step, expected[:, 8:], atol=2e-5, rtol=1e-4)


def test_merge_writes_through_to_the_kernel(kernel, tmp_path):
    """Merged adapters change weight in place: the kernel must see the new values (nothing cached)."""
    from loramux import MultiLoraModel
    from lora_fixtures import make_adapter

    base = tiny_llama(seed=6)
    path = make_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj", "down_proj"])
    lm = MultiLoraModel(copy.deepcopy(base))
    lm.load_adapter(path, adapter_name="a")
    ids = torch.randint(3, 96, (2, 1), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        routed = lm(input_ids=ids, adapter_names=["a", "a"]).logits
        lm.merge_adapter("a")
        merged = lm(input_ids=ids, adapter_names=["a", "a"]).logits
    torch.testing.assert_close(merged, routed, atol=1e-5, rtol=1e-4)


def test_switched_off_leaves_the_model_on_torch(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    monkeypatch.setattr(dense_kernel, "_state", {})  # the switch is read once per process: start afresh
    assert dense_kernel.load() is None
    model = tiny_llama(seed=8)
    expected_types = {n: type(m) for n, m in model.named_modules()}
    assert dense_kernel.install(model) == 0
    assert {n: type(m) for n, m in model.named_modules()} == expected_types


def test_a_failed_build_falls_back_to_torch(monkeypatch):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'x'\n/bin/sh: 1: c++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(cpu_kernel, "isa", lambda: "avx2")
    monkeypatch.setattr(dense_kernel, "_state", {})
    assert dense_kernel.load() is None
    model = tiny_llama(seed=9)
    ids = torch.randint(3, 96, (2, 3), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        assert dense_kernel.install(model) == 0
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_no_vector_isa_means_no_build(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "isa", lambda: None)
    monkeypatch.setattr(dense_kernel, "_state", {})
    assert dense_kernel.load() is None


@pytest.mark.parametrize("d", [576, 37, 5, 64])
def test_fused_rms_norm_equals_llama_rms_norm(kernel, d, threads):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 11, d, generator=g) * 3
    with torch.inference_mode():
        expected = norm(x)
        got = kernel.rms_norm(x, norm.weight, norm.variance_epsilon)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        rows = x.reshape(-1, d)
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(kernel.rms_norm(rows[4:5], norm.weight, 1e-5), got.reshape(-1, d)[4:5])
            assert torch.equal(kernel.rms_norm(rows, norm.weight, 1e-5), got.reshape(-1, d))


def test_install_fuses_llama_norms_only_and_uninstall_restores(kernel):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = tiny_llama(seed=10)
    norms = [n for n, m in model.named_modules() if type(m) is LlamaRMSNorm]
    dense_kernel.install(model)
    for name in norms:
        module = model.get_submodule(name)
        assert isinstance(module, LlamaRMSNorm) and type(module).__name__ == "FusedLlamaRMSNorm"
    dense_kernel.uninstall(model)
    assert all(type(model.get_submodule(n)) is LlamaRMSNorm for n in norms)
    assert not any(type(m) is DecodeLinear for m in model.modules())


def test_merge_and_unload_returns_plain_transformers_classes(kernel, tmp_path):
    """The returned model must not depend on install(): plain nn.Linear, the original norm class, SDPA; and it
    pickles (the fused norm classes and the attention name exist only in a process that ran install)."""
    import io

    from loramux import MultiLoraModel, decode_attention

    from lora_fixtures import make_adapter

    plain = tiny_llama(seed=8)
    path = make_adapter(plain, tmp_path / "a", seed=2, r=4, target_modules=["q_proj", "v_proj"])
    lm = MultiLoraModel(copy.deepcopy(plain))
    lm.load_adapter(path, adapter_name="a")
    merged = lm.merge_and_unload("a")
    assert not [n for n, m in merged.named_modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear]
    assert {type(m) for m in merged.modules()} <= {type(m) for m in plain.modules()}
    assert merged.config._attn_implementation == "sdpa" != decode_attention.ATTN_NAME
    torch.save(merged, io.BytesIO())


class _ShapeClock:
    """A clock under the test's control: each reading advances by what the shape now set costs (a pass's
    duration is the cost of the shape it ran with)."""

    def __init__(self, kernel, cost_8: float, cost_2: float) -> None:
        self.kernel, self.cost, self.now, self.readings = kernel, {False: cost_8, True: cost_2}, 0.0, 0

    def __call__(self) -> float:
        self.readings += 1
        self.now += self.cost[self.kernel.one_row_shape()]
        return self.now


@pytest.fixture
def undecided(kernel, monkeypatch):
    """No one-row shape chosen yet in this process (the process's own choice restored afterwards)."""
    monkeypatch.delenv(one_row_tiles.ENV, raising=False)
    saved = one_row_tiles._forget_for_tests(kernel)
    yield
    one_row_tiles._restore_for_tests(kernel, saved)


@pytest.mark.parametrize("cost_8,cost_2,expected", [(3.0, 1.0, True), (1.0, 3.0, False)])
def test_the_faster_one_row_shape_is_kept_for_the_process(kernel, undecided, monkeypatch, cost_8, cost_2, expected):
    monkeypatch.setattr(one_row_tiles, "MIN_BYTES", 0)
    linears = [nn.Linear(40, 24), nn.Linear(40, 7, bias=False), nn.Linear(24, 40)]
    clock = _ShapeClock(kernel, cost_8, cost_2)
    assert one_row_tiles.choose(kernel, linears, clock=clock) is expected
    assert kernel.one_row_shape() is expected
    assert clock.readings == 2 * 2 * one_row_tiles.ROUNDS  # both shapes, every timed round, start and end
    # decided once a process: a second model is not timed again and does not change it
    assert one_row_tiles.choose(kernel, linears, clock=_ShapeClock(kernel, cost_2, cost_8)) is expected
    assert kernel.one_row_shape() is expected


def test_the_one_row_shape_from_the_environment_or_left_for_small_models(kernel, undecided, monkeypatch):
    def no_clock() -> float:
        raise AssertionError("measured although it needed not be")

    linears = [nn.Linear(40, 24)]
    assert one_row_tiles.choose(kernel, linears, clock=no_clock) is None  # 4 KB of weights: nothing to time
    assert kernel.one_row_shape() is False
    monkeypatch.setenv(one_row_tiles.ENV, "2")
    assert one_row_tiles.choose(kernel, linears, clock=no_clock) is True
    assert kernel.one_row_shape() is True


def test_a_bad_one_row_setting_is_refused_before_the_model_changes(kernel, undecided, monkeypatch):
    monkeypatch.setenv(one_row_tiles.ENV, "4")
    model = tiny_llama()
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"LORAMUX_ONE_ROW_TILES='4': use 8 .* or 2 "):
        dense_kernel.install(model)
    assert [type(m) for m in model.modules()] == classes
    assert kernel.one_row_shape() is False
