"""Load/delete lifecycle: memory is released, slots are reused, and in-flight calls keep their weights."""
from __future__ import annotations

import copy
import gc
import threading

import psutil
import pytest
import torch

from lora_fixtures import VOCAB, make_adapter, tiny_llama
from loramux import MultiLoraModel, UnknownAdapterError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_llama(seed=21, hidden_size=64, intermediate_size=128)
    root = tmp_path_factory.mktemp("life")
    a = make_adapter(base, root / "a", seed=1, r=8, target_modules=["q_proj", "v_proj", "up_proj"])
    b = make_adapter(base, root / "b", seed=2, r=16, target_modules=["o_proj", "down_proj"])
    return base, a, b


def test_nbytes_is_parameter_bytes_and_report_adds_up(setup):
    base, a, b = setup
    m = MultiLoraModel(copy.deepcopy(base))
    info = m.load_adapter(a, adapter_name="a")
    # q: (8x64 + 64x8); v (2 kv heads of 16): (8x64 + 32x8); up: (8x64 + 128x8); 2 layers; fp32
    assert info.nbytes == 2 * 4 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8) + (8 * 64 + 128 * 8))
    assert info.rank == 8 and len(info.target_modules) == 6
    m.load_adapter(b, adapter_name="b")
    report = m.memory_report()
    assert report["total_bytes"] == report["base_bytes"] + info.nbytes + m.adapters["b"].nbytes
    assert report["full_copies_bytes"] == 2 * report["base_bytes"]


def test_delete_frees_slots_and_memory_over_many_cycles(setup):
    base, a, b = setup
    m = MultiLoraModel(copy.deepcopy(base))
    m.load_adapter(b, adapter_name="keep")
    proc = psutil.Process()
    for i in range(3):  # warm-up: allocator pools settle
        m.load_adapter(a, adapter_name="tmp")
        m.delete_adapter("tmp")
    gc.collect()
    rss_before = proc.memory_info().rss
    for i in range(60):
        info = m.load_adapter(a, adapter_name=f"tmp{i}")
        assert info.slot == 1, "a freed slot is reused: slot count does not grow"
        m.delete_adapter(f"tmp{i}")
    gc.collect()
    growth = proc.memory_info().rss - rss_before
    assert growth < 20 * info.nbytes, f"RSS grew by {growth} bytes over 60 load/delete cycles"
    assert all(w.slots.count == (1 if 0 in w.slots.occupied() else 0) for w in m._wrappers.values())
    assert list(m.adapters) == ["keep"]


def test_delete_and_replace_during_a_running_call(setup):
    """A call in flight keeps the weights it started with; the deleted slot is freed when it returns."""
    base, a, b = setup
    m = MultiLoraModel(copy.deepcopy(base))
    m.load_adapter(a, adapter_name="x")
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        expected_a = m(input_ids=ids, adapter_names="x").logits
    entered, release = threading.Event(), threading.Event()
    layer = m._wrappers["model.layers.1.self_attn.q_proj"]

    def pause(*_):
        entered.set()
        release.wait(600)  # opened by the test; the bound only stops a hang if the test dies first

    handle = layer.register_forward_pre_hook(pause)
    result = {}

    def call():  # under no_grad like expected_a: the grad path adds the delta unfused (other rounding)
        with torch.no_grad():
            result["out"] = m(input_ids=ids, adapter_names="x").logits

    t = threading.Thread(target=call, daemon=True)
    t.start()
    assert entered.wait(600)  # a guard against a hang, not a timing
    handle.remove()
    old_slot = m.adapters["x"].slot
    m.load_adapter(b, adapter_name="x", replace=True)   # hot swap while the call is half-way
    assert m.adapters["x"].slot != old_slot
    assert layer.slots.get(old_slot) is not None, "old weights stay while a call uses them"
    release.set()
    t.join()
    torch.testing.assert_close(result["out"], expected_a, atol=0, rtol=0)
    assert layer.slots.get(old_slot) is None, "freed once the call returned"
    with torch.no_grad():
        assert not torch.allclose(m(input_ids=ids, adapter_names="x").logits, expected_a)
    m.delete_adapter("x")
    with pytest.raises(UnknownAdapterError):
        m(input_ids=ids, adapter_names="x")


def test_wrapped_layer_without_batch_adapters_returns_base_output(setup):
    base, a, _ = setup
    m = MultiLoraModel(copy.deepcopy(base))
    m.load_adapter(a, adapter_name="a")
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 5))
    plain = MultiLoraModel(copy.deepcopy(base))  # the base through the same linears (dense_kernel), no adapters
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        torch.testing.assert_close(m(input_ids=ids, adapter_names=["__base__"] * 2).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(m(input_ids=ids).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(expected, base(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_load_from_a_parsed_adapter_file(setup):
    from loramux.adapter import read_adapter

    base, a, _ = setup
    m = MultiLoraModel(copy.deepcopy(base))
    parsed = read_adapter(a)
    m.load_adapter(parsed, adapter_name="p")
    m.load_adapter(a, adapter_name="d")
    assert m.adapters["p"].path == str(a) and m.adapters["p"].nbytes == m.adapters["d"].nbytes
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids, adapter_names="p").logits, m(input_ids=ids, adapter_names="d").logits)


def test_a_parsed_adapter_file_is_left_as_it_was_and_loads_again(setup):
    """A parsed AdapterFile (the host cache tier keeps them) is read, never scaled in place: loading it twice
    gives the weights of a load from the directory (which scales B over the file's own tensors), bit for bit."""
    from loramux.adapter import read_adapter

    base, a, _ = setup
    parsed = read_adapter(a)
    before = {name: (mw.lora_A.clone(), mw.lora_B.clone()) for name, mw in parsed.modules.items()}
    m = MultiLoraModel(copy.deepcopy(base))
    m.load_adapter(parsed, adapter_name="p1")
    m.load_adapter(parsed, adapter_name="p2")
    m.load_adapter(a, adapter_name="d")
    for name, mw in parsed.modules.items():
        assert torch.equal(mw.lora_A, before[name][0]) and torch.equal(mw.lora_B, before[name][1]), name
        entries = [m._wrappers[name].slots.entries[m.adapters[n].slot] for n in ("p1", "p2", "d")]
        for e in entries:
            assert e.B.T.is_contiguous() and e.B.shape == mw.lora_B.shape
            assert torch.equal(e.B, entries[2].B) and torch.equal(e.A, entries[2].A)
        scaling = m.adapters["d"].scalings[name]
        assert torch.equal(entries[2].B, before[name][1] * scaling)


def test_a_hand_built_adapter_file_is_checked_for_non_finite_A(setup):
    """read_adapter marks the files it checked; an AdapterFile built by hand is checked in full by the load."""
    import dataclasses

    from loramux.adapter import read_adapter
    from loramux.errors import AdapterWeightsError

    base, a, _ = setup
    parsed = read_adapter(a)
    name = next(iter(parsed.modules))
    bad_A = parsed.modules[name].lora_A.clone()
    bad_A[0, 0] = float("nan")
    modules = dict(parsed.modules, **{name: dataclasses.replace(parsed.modules[name], lora_A=bad_A)})
    hand_built = dataclasses.replace(parsed, modules=modules, finite_checked=False)
    m = MultiLoraModel(copy.deepcopy(base))
    with pytest.raises(AdapterWeightsError, match=rf"module '{name}': lora_A is not finite"):
        m.load_adapter(hand_built, adapter_name="bad")
    assert "bad" not in m.adapters and all(w.slots.count == 0 for w in m._wrappers.values())
