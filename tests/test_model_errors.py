"""Bad input: a specific AdapterError naming the culprit, and the model exactly as before."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramux
from lora_fixtures import VOCAB, make_adapter, tiny_gpt2, tiny_llama
from loramux import (AdapterConfigError, AdapterError, AdapterExistsError, AdapterNamesError, AdapterNotFoundError,
                     AdapterWeightsError, MultiLoraModel, TargetModuleError, UnknownAdapterError)

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=7)


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    return make_adapter(base, tmp_path_factory.mktemp("good") / "good", seed=3, r=4, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def model(base, good):
    m = MultiLoraModel(copy.deepcopy(base))
    m.load_adapter(good, adapter_name="good")
    return m


def _snapshot(model):
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        logits = {n: model(input_ids=ids, adapter_names=[n, n]).logits for n in ["good", "__base__"]}
    modules = sorted(name for name, _ in model.base_model.named_modules())
    return ids, logits, dict(model.adapters), modules


def _assert_unchanged(model, snapshot):
    ids, logits, adapters, modules = snapshot
    assert dict(model.adapters) == adapters
    assert sorted(name for name, _ in model.base_model.named_modules()) == modules
    with torch.no_grad():
        for n, expected in logits.items():
            torch.testing.assert_close(model(input_ids=ids, adapter_names=[n, n]).logits, expected, atol=0, rtol=0)


def _copy(good, tmp_path, name="bad"):
    return shutil.copytree(good, tmp_path / name)


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del cfg[key]
    (path / "adapter_config.json").write_text(json.dumps(cfg))


_DROP = object()


def _edit_weights(path, fn):
    tensors = load_file(str(path / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS))


def _key(tensors, part):
    return next(k for k in tensors if part in k)


def _nan(t):
    t[_key(t, "lora_B")][0, 0] = float("nan")


def _bad_rank(t):
    k = _key(t, "lora_B")
    t[k] = torch.randn(t[k].shape[0], 3)


def _wrong_shape(t):
    k = _key(t, "lora_A")
    t[k] = torch.randn(4, 48)


def _unknown_module(t):
    t["base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight"] = torch.randn(4, 32)
    t["base_model.model.model.layers.0.self_attn.qq_proj.lora_B.weight"] = torch.randn(32, 4)


def _stray(t):
    t["base_model.model.lm_head.something"] = torch.randn(3)


CASES = [
    # (id, how to break the copy, exception, message fragments)
    ("missing_dir", lambda p: shutil.rmtree(p), AdapterNotFoundError, ["does not exist"]),
    ("missing_config", lambda p: (p / "adapter_config.json").unlink(), AdapterNotFoundError, ["adapter_config.json", "missing"]),
    ("config_not_json", lambda p: (p / "adapter_config.json").write_text("{r: 4"), AdapterConfigError, ["not valid JSON"]),
    ("config_without_r", lambda p: _edit_config(p, r=_DROP), AdapterConfigError, ["missing field 'r'"]),
    ("other_peft_type", lambda p: _edit_config(p, peft_type="IA3"), AdapterConfigError, ["peft_type 'IA3'"]),
    ("bias_all", lambda p: _edit_config(p, bias="all"), AdapterConfigError, ["bias='all'"]),
    ("unknown_variant", lambda p: _edit_config(p, use_qalora=True), AdapterConfigError, ["'use_qalora'"]),
    ("pissa_init", lambda p: _edit_config(p, init_lora_weights="pissa"), AdapterConfigError, ["init_lora_weights='pissa'"]),
    ("missing_weights", lambda p: (p / WEIGHTS).unlink(), AdapterNotFoundError, ["no adapter_model.safetensors"]),
    ("truncated_weights", lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:100]), AdapterWeightsError,
     [WEIGHTS, "truncated or corrupt"]),
    ("garbage_weights", lambda p: (p / WEIGHTS).write_bytes(b"\x00" * 64), AdapterWeightsError, ["truncated or corrupt"]),
    ("nan", lambda p: _edit_weights(p, _nan), AdapterWeightsError, ["NaN or inf", "lora_B"]),
    ("rank_disagrees", lambda p: _edit_weights(p, _bad_rank), AdapterWeightsError, ["disagree on the rank"]),
    ("config_rank_disagrees", lambda p: _edit_config(p, r=8), AdapterWeightsError, ["rank 4", "r=8"]),
    ("other_base_model", lambda p: _edit_weights(p, _wrong_shape), AdapterWeightsError,
     ["lora_A has shape (4, 48)", "needs (4, 32)", "different base model"]),
    ("module_not_in_base", lambda p: _edit_weights(p, _unknown_module), TargetModuleError, ["qq_proj"]),
    ("target_not_in_base", lambda p: _edit_config(p, target_modules=["q_proj", "c_attn"]), TargetModuleError,
     ["'c_attn'", "target_modules"]),
    ("stray_tensor", lambda p: _edit_weights(p, _stray), AdapterWeightsError, ["lm_head.something", "modules_to_save"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_is_refused_and_model_unchanged(model, good, tmp_path, case):
    _, breaker, exc_type, fragments = case
    path = _copy(good, tmp_path)
    breaker(path)
    snapshot = _snapshot(model)
    with pytest.raises(exc_type) as info:
        model.load_adapter(path, adapter_name="bad")
    assert isinstance(info.value, AdapterError)
    for fragment in fragments:
        assert fragment in str(info.value)
    _assert_unchanged(model, snapshot)
    # replacing an existing adapter with a bad one keeps the old one
    with pytest.raises(exc_type):
        model.load_adapter(path, adapter_name="good", replace=True)
    _assert_unchanged(model, snapshot)


def test_adapter_for_another_architecture(model, tmp_path):
    gpt2 = tiny_gpt2()
    path = make_adapter(gpt2, tmp_path / "gpt2", r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    snapshot = _snapshot(model)
    with pytest.raises(TargetModuleError, match="'c_attn'"):
        model.load_adapter(path)
    _assert_unchanged(model, snapshot)


def test_pickle_refused_unless_allowed(model, good, tmp_path):
    path = _copy(good, tmp_path)
    torch.save(load_file(str(path / WEIGHTS)), path / "adapter_model.bin")
    (path / WEIGHTS).unlink()
    snapshot = _snapshot(model)
    with pytest.raises(AdapterWeightsError, match="pickle weights can run arbitrary code.*allow_pickle=True"):
        model.load_adapter(path, adapter_name="pickled")
    _assert_unchanged(model, snapshot)
    info = model.load_adapter(path, adapter_name="pickled", allow_pickle=True)
    ids = snapshot[0]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names="pickled").logits, snapshot[1]["good"])
    assert info.nbytes == model.adapters["good"].nbytes


def test_duplicate_name_needs_replace(model, good):
    snapshot = _snapshot(model)
    with pytest.raises(AdapterExistsError, match="'good' is already loaded.*replace=True"):
        model.load_adapter(good, adapter_name="good")
    _assert_unchanged(model, snapshot)
    with pytest.raises(AdapterNamesError, match="'__base__'"):
        model.load_adapter(good, adapter_name="__base__")


def test_unknown_and_misshaped_adapter_names(model):
    snapshot = _snapshot(model)
    ids = snapshot[0]
    with pytest.raises(UnknownAdapterError, match="'sql'.*loaded: \\['good'\\]"):
        model(input_ids=ids, adapter_names=["good", "sql"])
    with pytest.raises(AdapterNamesError, match="3 entries but the batch has 2 rows"):
        model(input_ids=ids, adapter_names=["good", "good", "good"])
    with pytest.raises(AdapterNamesError, match="list of names"):
        model(input_ids=ids, adapter_names={"good": 1})
    with pytest.raises(UnknownAdapterError, match="'sql'"):
        model.delete_adapter("sql")
    with pytest.raises(UnknownAdapterError):
        with model.adapter("sql"):
            pass
    _assert_unchanged(model, snapshot)
    assert all(state.inflight == 0 for state in model._slot_states.values()), "a failed call must not stay pinned"


def test_errors_are_catchable_as_builtins(tmp_path, model):
    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "nowhere")
    with pytest.raises(LookupError):
        model.delete_adapter("nowhere")
    assert issubclass(loramux.AdapterConfigError, ValueError)
