"""Property tests: mutated adapters (config values, safetensors headers, raw bytes) are either refused with an
AdapterError whose message names the file or field, the model left exactly as it was, or, when the mutation
is benign, loaded with outputs equal to PEFT's on the same files. No bare builtin exception may escape.

Bounded and deterministic for CI: derandomize=True, no example database, modest max_examples.
"""
from __future__ import annotations

import copy
import json
import shutil
import struct
import uuid

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_fixtures import VOCAB, make_adapter, tiny_llama  # noqa: E402
from loramux import AdapterError, MultiLoraModel  # noqa: E402

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, one good adapter (q, v and the embedding) loaded, and the outputs to compare against."""
    base = tiny_llama(seed=5)
    root = tmp_path_factory.mktemp("validation")
    good = make_adapter(base, root / "good", seed=9, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = MultiLoraModel(copy.deepcopy(base))
    model.load_adapter(good, adapter_name="good")
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        expected = {n: model(input_ids=ids, adapter_names=[n, n]).logits for n in ("good", "__base__")}
    return dict(base=base, good=good, model=model, ids=ids, expected=expected, adapters=dict(model.adapters),
                modules=sorted(n for n, _ in model.base_model.named_modules()), root=root)


def _fresh_copy(world):
    path = world["root"] / f"m{uuid.uuid4().hex[:10]}"
    shutil.copytree(world["good"], path)
    return path


def _peft_logits(world, path):
    """PEFT on the same (mutated) files, or None where PEFT itself cannot load them. One PeftModel is kept
    (built on first use) and the mutant loaded beside its first adapter, then deleted: a fresh model per
    example would cost a base copy each."""
    from peft import PeftModel

    if world.get("peft") is None:
        world["peft"] = PeftModel.from_pretrained(copy.deepcopy(world["base"]), str(world["good"]), adapter_name="good").eval()
    peft = world["peft"]
    try:
        with torch.no_grad():
            peft.load_adapter(str(path), adapter_name="mutant")
            peft.set_adapter("mutant")
            return peft(input_ids=world["ids"]).logits
    except Exception:  # noqa: BLE001 - PEFT's own refusals are not under test
        return None
    finally:
        try:
            peft.set_adapter("good")
            if "mutant" in peft.peft_config:
                peft.delete_adapter("mutant")
        except Exception:  # noqa: BLE001 - a half-loaded PEFT adapter: start afresh next time
            world["peft"] = None


def _check(world, path, names):
    """Load the mutated adapter; assert the property; leave the model as it was."""
    model = world["model"]
    try:
        model.load_adapter(path, adapter_name="mutant")
    except AdapterError as exc:
        message = str(exc)
        assert any(n in message for n in names), f"message names neither the file nor the field: {message}"
        assert dict(model.adapters) == world["adapters"]
        assert sorted(n for n, _ in model.base_model.named_modules()) == world["modules"]
        with torch.no_grad():
            for n, logits in world["expected"].items():
                assert torch.equal(model(input_ids=world["ids"], adapter_names=[n, n]).logits, logits)
        return "refused"
    try:
        expected = _peft_logits(world, path)
        if expected is not None:
            with torch.no_grad():
                got = model(input_ids=world["ids"], adapter_names="mutant").logits
            if torch.isfinite(expected).all():
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        model.delete_adapter("mutant")
    return "loaded"


# ---------------------------------------------------------------- config values
FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "modules_to_save", "use_rslora",
          "fan_in_fan_out", "use_dora", "layers_to_transform", "layers_pattern", "exclude_modules", "bias", "peft_type",
          "init_lora_weights", "lora_bias", "not_a_field"]
SPECIAL = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1e39, 10 ** 60, 0, -3, 2, 4, 0.5, True,
                           False, None, "", "(", "[a-", "q_proj", "v_proj", "all-linear", ".*", "none", "LORA"])
LEAF = st.none() | st.booleans() | st.integers(-10, 10 ** 6) | st.floats(allow_nan=True, allow_infinity=True) \
    | st.text(max_size=6) | SPECIAL
JSONISH = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6) | SPECIAL.filter(
    lambda v: isinstance(v, str)), c, max_size=3), max_leaves=6)


@settings(max_examples=60, **SETTINGS)
@given(field=st.sampled_from(FIELDS), value=JSONISH)
def test_config_value_mutations(world, field, value):
    path = _fresh_copy(world)
    cfg = json.loads((path / CONFIG).read_text())
    cfg[field] = value
    (path / CONFIG).write_text(json.dumps(cfg))  # NaN/Infinity written as JSON's non-standard literals
    event(_check(world, path, [CONFIG, field, WEIGHTS]))


# ---------------------------------------------------------------- safetensors header
def _split(path):
    raw = (path / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path, header, data):
    blob = json.dumps(header).encode()
    (path / WEIGHTS).write_bytes(struct.pack("<Q", len(blob)) + blob + data)


HEADER_FIELD = st.sampled_from(["dtype", "shape", "data_offsets", "rename", "drop", "duplicate", "metadata"])


@settings(max_examples=40, **SETTINGS)
@given(which=st.integers(0, 50), what=HEADER_FIELD, value=JSONISH | st.lists(st.integers(-2, 2 ** 31), max_size=3))
def test_header_mutations(world, which, what, value):
    path = _fresh_copy(world)
    header, data = _split(path)
    keys = sorted(k for k in header if k != "__metadata__")
    key = keys[which % len(keys)]
    if what in ("dtype", "shape", "data_offsets"):
        header[key] = dict(header[key], **{what: value})
    elif what == "rename":
        header[str(value)[:40] + ".lora_A.weight"] = header.pop(key)
    elif what == "drop":
        del header[key]
    elif what == "duplicate":  # another key pointing at the same bytes
        header[key.replace("layers.0", "layers.1").replace("q_proj", "k_proj")] = dict(header[key])
    else:
        header["__metadata__"] = value
    _join(path, header, data)
    event(_check(world, path, [WEIGHTS]))


# ---------------------------------------------------------------- raw bytes
@settings(max_examples=40, **SETTINGS)
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert"]), st.floats(0, 1), st.integers(0, 255)),
                      min_size=1, max_size=3), header_bias=st.booleans())
def test_byte_mutations(world, edits, header_bias):
    path = _fresh_copy(world)
    raw = bytearray((path / WEIGHTS).read_bytes())
    header_end = 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
    for op, where, byte in edits:
        span = header_end if header_bias else len(raw)
        i = min(int(where * span), max(len(raw) - 1, 0))
        if op == "flip" and raw:
            raw[i] ^= 1 << (byte % 8)
        elif op == "set" and raw:
            raw[i] = byte
        elif op == "cut":
            del raw[i:i + 1 + byte % 16]
        else:
            raw[i:i] = bytes([byte]) * (1 + byte % 4)
    (path / WEIGHTS).write_bytes(bytes(raw))
    event(_check(world, path, [WEIGHTS]))


def test_property_outcomes_cover_both_branches(world):
    """The mutation strategies reach refusals and benign loads alike (otherwise the properties prove little)."""
    path = _fresh_copy(world)
    cfg = json.loads((path / CONFIG).read_text())
    cfg["lora_alpha"] = 3.5  # benign: loads and equals PEFT with that alpha
    (path / CONFIG).write_text(json.dumps(cfg))
    assert _check(world, path, [CONFIG]) == "loaded"
    path = _fresh_copy(world)
    cfg["lora_alpha"] = float("nan")
    (path / CONFIG).write_text(json.dumps(cfg))
    assert _check(world, path, [CONFIG, "lora_alpha"]) == "refused"
