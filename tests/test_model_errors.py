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


def _big_b(t):
    t[_key(t, "lora_B")][0, 0] = 1e10  # finite, but 1e10 * 1e30 / 4 is past float32's 3.4e38


def _int_a(t):
    k = _key(t, "lora_A")
    t[k] = torch.ones(t[k].shape, dtype=torch.int64)


def _raw_config(path, text):
    (path / "adapter_config.json").write_text(text)


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
    # non-finite or overflowing scaling: refused from the config, or from B once scaled
    ("alpha_nan", lambda p: _edit_config(p, lora_alpha=float("nan")), AdapterConfigError, ["'lora_alpha'", "nan", "finite"]),
    ("alpha_inf", lambda p: _edit_config(p, lora_alpha=float("inf")), AdapterConfigError, ["'lora_alpha'", "inf"]),
    ("alpha_1e308", lambda p: _edit_config(p, lora_alpha=1e308), AdapterConfigError, ["'lora_alpha'", "overflows float32"]),
    ("alpha_huge_int", lambda p: _edit_config(p, lora_alpha=10 ** 400), AdapterConfigError, ["'lora_alpha'", "overflows"]),
    ("alpha_pattern_nan", lambda p: _edit_config(p, alpha_pattern={"q_proj": float("nan")}), AdapterConfigError,
     ["alpha_pattern['q_proj']", "nan"]),
    ("scaled_b_overflows", lambda p: (_edit_config(p, lora_alpha=1e30), _edit_weights(p, _big_b)), AdapterWeightsError,
     ["scaled lora_B", "lora_alpha", "overflows"]),
    # malformed configs: AdapterConfigError naming the field
    ("target_not_string", lambda p: _edit_config(p, target_modules=[1, "q_proj"]), AdapterConfigError, ["'target_modules[0]'"]),
    ("target_wrong_type", lambda p: _edit_config(p, target_modules=5), AdapterConfigError, ["'target_modules'"]),
    ("target_bad_regex", lambda p: _edit_config(p, target_modules="q_proj("), AdapterConfigError,
     ["'target_modules'", "regular expression"]),
    ("rank_pattern_bad_regex", lambda p: _edit_config(p, rank_pattern={"(q": 4}), AdapterConfigError,
     ["rank_pattern['(q']", "regular expression"]),
    ("rank_pattern_not_int", lambda p: _edit_config(p, rank_pattern={"q_proj": 4.5}), AdapterConfigError,
     ["rank_pattern['q_proj']", "positive integer"]),
    ("alpha_pattern_not_number", lambda p: _edit_config(p, alpha_pattern={"q_proj": "8"}), AdapterConfigError,
     ["alpha_pattern['q_proj']", "a number"]),
    ("alpha_pattern_wrong_type", lambda p: _edit_config(p, alpha_pattern=[8]), AdapterConfigError, ["'alpha_pattern'"]),
    ("modules_to_save_string", lambda p: _edit_config(p, modules_to_save="lm_head"), AdapterConfigError,
     ["'modules_to_save'", "letter by letter"]),
    ("modules_to_save_not_string", lambda p: _edit_config(p, modules_to_save=[["lm_head"]]), AdapterConfigError,
     ["'modules_to_save[0]'"]),
    ("bool_as_string", lambda p: _edit_config(p, use_dora="false"), AdapterConfigError, ["'use_dora'", "true or false"]),
    ("layers_wrong_type", lambda p: _edit_config(p, layers_to_transform=["0"]), AdapterConfigError, ["'layers_to_transform'"]),
    ("r_not_int", lambda p: _edit_config(p, r="4"), AdapterConfigError, ["'r'", "positive integer"]),
    ("deep_json", lambda p: _raw_config(p, '{"r": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"), AdapterConfigError,
     ["adapter_config.json", "RecursionError"]),
    ("int_past_digit_limit", lambda p: _raw_config(p, '{"r": 1' + "0" * 5000 + "}"), AdapterConfigError,
     ["adapter_config.json", "not valid JSON"]),
    ("config_is_list", lambda p: _raw_config(p, "[1, 2]"), AdapterConfigError, ["expected a JSON object"]),
    ("int_weights", lambda p: _edit_weights(p, _int_a), AdapterWeightsError, ["lora_A", "I64", "floating point"]),
    ("modules_to_save_bad_regex", lambda p: _edit_config(p, modules_to_save=["lm_head("]), AdapterConfigError,
     ["'modules_to_save[0]'", "regular expression"]),
    # config and weights disagree: PEFT would silently ignore (or invent) tensors, so loramux refuses
    ("target_modules_null", lambda p: _edit_config(p, target_modules=None), AdapterConfigError,
     ["'target_modules'", "missing or null"]),
    ("weights_outside_target_modules", lambda p: _edit_config(p, target_modules=["q_proj"]), AdapterWeightsError,
     ["v_proj", "does not target it"]),
    ("weights_outside_layers_to_transform", lambda p: _edit_config(p, layers_to_transform=[0]), AdapterWeightsError,
     ["layers.1", "does not target it"]),
    ("lora_bias_without_tensors", lambda p: _edit_config(p, lora_bias=True), AdapterWeightsError,
     ["lora_bias is set", "no lora_B.bias"]),
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
    assert all(model.pins(info) == 0 for info in model.adapters.values()), "a failed call must not stay pinned"


def test_errors_are_catchable_as_builtins(tmp_path, model):
    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "nowhere")
    with pytest.raises(LookupError):
        model.delete_adapter("nowhere")
    assert issubclass(loramux.AdapterConfigError, ValueError)


def _write_lying_file(path, declared_elems, data_bytes):
    """A safetensors file whose header declares lora_A as (4, declared_elems) float32, followed by
    ``data_bytes`` of (sparse: never written) data: the header claims gigabytes the test never allocates."""
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    b_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    a_bytes = 4 * declared_elems * 4
    header = {b_key: {"dtype": "F32", "shape": [32, 4], "data_offsets": [0, 512]},
              a_key: {"dtype": "F32", "shape": [4, declared_elems], "data_offsets": [512, 512 + a_bytes]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / WEIGHTS, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + data_bytes)  # sparse: no page of it is written or read


@pytest.mark.parametrize("file_matches_header", [True, False], ids=["sparse_2GiB_file", "header_lies_about_size"])
def test_2gib_tensor_refused_from_the_header_without_allocating(model, good, tmp_path, file_matches_header):
    psutil = pytest.importorskip("psutil")
    path = _copy(good, tmp_path)
    elems = 2 ** 27  # (4, 2**27) float32 = 2 GiB
    _write_lying_file(path, elems, 512 + 16 * elems if file_matches_header else 512)
    snapshot = _snapshot(model)
    process = psutil.Process()
    before = process.memory_info().rss
    with pytest.raises(AdapterWeightsError) as info:
        model.load_adapter(path, adapter_name="huge")
    grown = process.memory_info().rss - before
    assert grown < 200 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.0f} MiB while refusing the file"
    message = str(info.value)
    assert WEIGHTS in message
    if file_matches_header:
        assert "lora_A has shape (4, 134217728)" in message and "needs (4, 32)" in message
    else:
        assert "data_offsets" in message and "outside the file" in message
    _assert_unchanged(model, snapshot)


def test_header_is_checked_before_any_tensor_is_read(model, good, tmp_path, monkeypatch):
    """A shape that does not fit the base is refused by the header check: the data reader is never called."""
    from loramux import st_read

    path = _copy(good, tmp_path)
    _edit_weights(path, _wrong_shape)
    calls = []
    monkeypatch.setattr(st_read, "read_data", lambda *a, **k: calls.append(a) or torch.empty(0, dtype=torch.uint8))
    with pytest.raises(AdapterWeightsError, match="needs \\(4, 32\\)"):
        model.load_adapter(path, adapter_name="bad")
    assert calls == []


def test_failed_commit_leaves_no_half_written_slot(base, model, tmp_path, monkeypatch):
    """A slot write that raises part-way (e.g. out of memory): every written slot is cleared, every wrapper
    this load created is removed, the model answers as before, and the next load works."""
    from loramux.slots import SlotTable

    path = make_adapter(base, tmp_path / "wide", seed=5, r=2,
                        target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])
    snapshot = _snapshot(model)
    real_write, writes = SlotTable.write, []

    def failing_write(self, slot, entry):
        if len(writes) == 3:
            raise RuntimeError("simulated out of memory in slot write")
        writes.append(slot)
        real_write(self, slot, entry)

    monkeypatch.setattr(SlotTable, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated"):
        model.load_adapter(path, adapter_name="wide")
    monkeypatch.setattr(SlotTable, "write", real_write)
    assert len(writes) == 3
    _assert_unchanged(model, snapshot)
    for wrapper in model._wrappers.values():
        assert wrapper.slots.occupied() == [model.adapters["good"].slot]
    info = model.load_adapter(path, adapter_name="wide")
    assert len(info.ranks) == 8
