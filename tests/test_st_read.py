"""st_read: a safetensors file's tensors from one read into one buffer, the same values safetensors gives."""
from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramux
from lora_fixtures import VOCAB, make_adapter, tiny_llama
from loramux import AdapterWeightsError, MultiLoraModel, st_read
from loramux.st_header import read_header

WEIGHTS = "adapter_model.safetensors"


def _mixed(path):
    torch.manual_seed(0)
    tensors = {"a.f32": torch.randn(3, 5), "b.f16": torch.randn(7).half(), "c.bf16": torch.randn(2, 3).bfloat16(),
               "d.i64": torch.arange(5), "e.empty": torch.zeros(0, 4), "f.scalar": torch.tensor(2.5),
               "g.f64": torch.randn(4, 1, 2).double(), "h.bool": torch.tensor([True, False, True])}
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("share", [True, False])
def test_tensors_equal_safetensors_load_file(tmp_path, share):
    path = tmp_path / "m.safetensors"
    _mixed(path)
    expected = load_file(str(path))
    read = st_read.read_tensors(path, read_header(path), share=share)
    assert list(read.tensors) == list(expected)  # the same order (by offset) as safetensors gives
    for key, tensor in expected.items():
        got = read.tensors[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.is_contiguous()
        assert torch.equal(got, tensor), key
    storages = {t.untyped_storage().data_ptr() for t in read.tensors.values() if t.numel()}
    if share:  # one buffer, every tensor a view of it
        assert len(storages) == 1
        assert read.runs and all(key in read.in_runs for key in ("a.f32", "b.f16", "c.bf16", "g.f64", "f.scalar"))
        assert "d.i64" not in read.in_runs and "h.bool" not in read.in_runs  # not floats: not in the finite check
        covered = sum(run.numel() * run.element_size() for run in read.runs)
        assert covered == sum(t.numel() * t.element_size() for k, t in expected.items() if k in read.in_runs)
    else:  # each tensor in memory of its own, no bigger than itself
        assert len(storages) == sum(1 for t in read.tensors.values() if t.numel())
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in read.tensors.values())
        assert read.runs == [] and read.in_runs == set()


def test_misaligned_tensor_is_copied_with_its_values(tmp_path):
    """A writer without safetensors' padding can put an F32 tensor at an odd offset: its bytes are copied."""
    f16 = torch.randn(3).half()            # 6 bytes: the F32 after it starts at offset 6
    f32 = torch.randn(2, 2)
    header = {"x": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
              "y": {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}}
    blob = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + f16.numpy().tobytes() + f32.numpy().tobytes())
    read = st_read.read_tensors(path, read_header(path), share=True)
    assert torch.equal(read.tensors["x"], f16) and torch.equal(read.tensors["y"], f32)
    assert "y" not in read.in_runs  # its copy is checked on its own


def test_refuses_what_safetensors_refuses(tmp_path):
    """Overlapping tensors pass read_header's per-tensor checks; safetensors' own validation still refuses them."""
    from safetensors import SafetensorError

    data = torch.randn(4).numpy().tobytes()
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "y": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    blob = json.dumps(header).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    specs = read_header(path)  # each entry is fine on its own
    with pytest.raises(SafetensorError):
        st_read.read_tensors(path, specs, share=True)


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=7)


def test_a_load_reads_the_data_once_and_never_per_tensor(base, tmp_path, monkeypatch):
    import safetensors.torch

    path = make_adapter(base, tmp_path / "a", seed=3, r=4, target_modules=["q_proj", "v_proj", "up_proj"])
    reads = []
    real = st_read.read_data
    monkeypatch.setattr(st_read, "read_data", lambda *a: reads.append(a) or real(*a))
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("per-tensor reader called"))
    model = MultiLoraModel(copy.deepcopy(base))
    info = model.load_adapter(path, adapter_name="a")
    data_bytes = sum(s.nbytes for s in read_header(path / WEIGHTS).values())
    assert [(a[2]) for a in reads] == [data_bytes]
    # the slots hold views of that one buffer: A as read, B scaled and transposed over its own bytes
    storages = {model._wrappers[m].slots.get(info.slot).A.untyped_storage().data_ptr() for m in info.ranks}
    storages |= {model._wrappers[m].slots.get(info.slot).B.untyped_storage().data_ptr() for m in info.ranks}
    assert len(storages) == 1


def test_loaded_adapter_matches_peft_and_file_stays_unchanged(base, tmp_path):
    """In-place scaling writes into the load's own buffer only: the file and a second load are unaffected."""
    from lora_fixtures import peft_oracle

    path = make_adapter(base, tmp_path / "a", seed=4, r=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])
    before = (path / WEIGHTS).read_bytes()
    model = MultiLoraModel(copy.deepcopy(base))
    model.load_adapter(path, adapter_name="a")
    model.load_adapter(path, adapter_name="b")
    assert (path / WEIGHTS).read_bytes() == before
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    peft = peft_oracle(base, {"a": path})
    peft.set_adapter("a")
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        for name in ("a", "b"):
            torch.testing.assert_close(model(input_ids=ids, adapter_names=[name, name]).logits, expected,
                                       atol=1e-5, rtol=1e-5)


def test_non_lora_tensors_get_memory_of_their_own(base, tmp_path):
    """A file with modules_to_save tensors gives each tensor memory of its own: the load copies those tensors
    into the module's copy, and the LoRA tensors must not keep the whole file's buffer (theirs too) alive."""
    path = make_adapter(base, tmp_path / "m", seed=5, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    parsed = loramux.adapter.read_adapter(path)
    for mw in parsed.modules.values():
        for t in (mw.lora_A, mw.lora_B):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_nan_in_one_tensor_is_named(base, tmp_path):
    path = make_adapter(base, tmp_path / "n", seed=6, r=4, target_modules=["q_proj", "v_proj"])
    tensors = load_file(str(path / WEIGHTS))
    key = sorted(k for k in tensors if "lora_A" in k)[-1]
    tensors[key][1, 2] = float("inf")
    save_file(tensors, str(path / WEIGHTS))
    model = MultiLoraModel(copy.deepcopy(base))
    with pytest.raises(AdapterWeightsError, match=key.replace(".", r"\.") + ".*NaN or inf"):
        model.load_adapter(path, adapter_name="n")
    assert dict(model.adapters) == {}


def test_failure_after_in_place_scaling_leaves_model_and_file_as_they_were(base, tmp_path):
    """The B are scaled over their own bytes before the overflow check refuses the load: the model keeps
    only what it had, the file is untouched, and the adapter it had still answers as before."""
    good = make_adapter(base, tmp_path / "good", seed=8, r=4, target_modules=["q_proj", "v_proj"])
    bad = make_adapter(base, tmp_path / "bad", seed=9, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    tensors = load_file(str(bad / WEIGHTS))
    for key in tensors:
        if "down_proj.lora_B" in key:
            tensors[key].fill_(1e30)  # finite, but * alpha/r overflows float32 only once scaled
    save_file(tensors, str(bad / WEIGHTS))
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 1e10
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    before = (bad / WEIGHTS).read_bytes()
    model = MultiLoraModel(copy.deepcopy(base))
    model.load_adapter(good, adapter_name="good")
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=["good", "good"]).logits
    modules = sorted(n for n, _ in model.base_model.named_modules())
    with pytest.raises(AdapterWeightsError, match="down_proj.*scaled lora_B.*overflows"):
        model.load_adapter(bad, adapter_name="bad")
    assert list(model.adapters) == ["good"] and (bad / WEIGHTS).read_bytes() == before
    assert sorted(n for n, _ in model.base_model.named_modules()) == modules  # no wrapper left on down_proj
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=["good", "good"]).logits, expected, atol=0, rtol=0)
