"""Every architecture of the zoo: PEFT parity solo and mixed, generate routing, clean delete, refusals.

fp32, atol 1e-4. PEFT is the oracle for each adapter alone (its own ``adapter_names`` mixed batches
refuse target_parameters, so a mixed row is compared with PEFT on that row's adapter); generation
compares a left-padded mixed batch with each row alone (same padding), greedy and beam.
"""
from __future__ import annotations

import copy

import pytest
import torch

from loramux import MultiLoraModel, TargetModuleError
from zoo_archs import ARCHS, BOS, IMAGE_TOKEN, PAD, VOCAB, Arch, _default_adapters, save_adapter

ATOL = 1e-4
IMAGE_TOKENS = 4  # (8 / 4)^2 patches per 8x8 image in the tiny Llava
BY_NAME = {a.name: a for a in ARCHS}


def _inputs(arch: Arch, rows: int, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (rows, seq), generator=g)
    if arch.kind == "encdec":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB - 2, (rows, 5), generator=g)}
    if arch.kind == "vlm":
        ids[:, 1:1 + IMAGE_TOKENS] = IMAGE_TOKEN
        return {"input_ids": ids, "pixel_values": torch.randn(rows, 3, 8, 8, generator=g)}
    return {"input_ids": ids}


def _row(inputs: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in inputs.items()}


@pytest.fixture(scope="module", params=[a.name for a in ARCHS])
def zoo(request, tmp_path_factory):
    from peft import PeftModel

    arch = BY_NAME[request.param]
    base = arch.build()
    root = tmp_path_factory.mktemp(arch.name)
    specs = (arch.adapters or _default_adapters)(base)
    paths = {n: save_adapter(base, root / n, seed=17 + i, **kw) for i, (n, kw) in enumerate(specs.items())}
    ours = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        ours.load_adapter(path, adapter_name=name)
    names = list(paths)
    inputs = _inputs(arch, len(names) + 1)
    with torch.no_grad():
        expected = {"__base__": base(**inputs).logits}
        for name, path in paths.items():
            expected[name] = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()(**inputs).logits
    return arch, base, ours, paths, inputs, expected


def test_logits_match_peft_solo_and_mixed(zoo):
    arch, _, ours, paths, inputs, expected = zoo
    with torch.no_grad():
        for name in paths:
            assert (expected[name] - expected["__base__"]).abs().max() > 1e-3, f"{name} must change the output"
            got = ours(**inputs, adapter_names=name).logits
            torch.testing.assert_close(got, expected[name], atol=ATOL, rtol=0, msg=lambda m: f"{arch.name} solo {name}: {m}")
        rows = list(paths) + ["__base__"]
        for order in (rows, rows[::-1]):
            got = ours(**inputs, adapter_names=order).logits
            for i, name in enumerate(order):
                torch.testing.assert_close(got[i], expected[name][i], atol=ATOL, rtol=0,
                                           msg=lambda m: f"{arch.name} mixed row {i} {name}: {m}")


def _left_padded(arch: Arch, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    lengths = [8 - 2 * (i % 2) for i in range(n)]  # 8 or 6: room for BOS and 4 image tokens
    ids = torch.full((n, 8), PAD)
    mask = torch.zeros(n, 8, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, 8 - length:] = torch.randint(3, VOCAB - 2, (length,), generator=g)
        ids[i, 8 - length] = BOS
        mask[i, 8 - length:] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if arch.kind == "vlm":
        for i, length in enumerate(lengths):
            ids[i, 8 - length + 1:8 - length + 1 + IMAGE_TOKENS] = IMAGE_TOKEN
        out["pixel_values"] = torch.randn(n, 3, 8, 8, generator=g)
    return out


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_left_padded_mixed_batch_equals_each_row_alone(zoo, beams):
    arch, _, ours, paths, _, _ = zoo
    if arch.kind == "cls":
        pytest.skip("encoder classification models do not generate")
    if beams > 1 and (not arch.beam or arch.kind in ("encdec", "moe")):
        pytest.skip("beam search: dense decoders only (greedy covers routing for the rest; tests/test_model_routing.py beams GPT-2)")
    rows = list(paths) + ["__base__"]
    batch = _left_padded(arch, len(rows))
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=PAD, eos_token_id=None)
    if arch.kind == "encdec":
        kw.update(min_length=0, forced_eos_token_id=None, no_repeat_ngram_size=0)
    out = ours.generate(**batch, adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        solo = ours.generate(**_row(batch, i), adapter_names=[name], **kw)
        assert out[i].tolist() == solo[0].tolist(), f"{arch.name} beams={beams} row {i} ({name})"


def test_deleting_every_adapter_restores_the_base_bit_for_bit(zoo):
    arch, base, _, paths, inputs, expected = zoo
    # the reference is the wrapped model before any load: MultiLoraModel may route the base's own
    # linears through its decode GEMM kernel (dense_kernel.py), equal to plain transformers to fp32 rounding
    ours = MultiLoraModel(copy.deepcopy(base))
    with torch.no_grad():
        untouched = ours(**inputs).logits
    torch.testing.assert_close(untouched, expected["__base__"], atol=1e-5, rtol=0)
    for name, path in paths.items():
        ours.load_adapter(path, adapter_name=name)
    with torch.no_grad():
        ours(**inputs, adapter_names=list(paths) + ["__base__"])
        for name in paths:
            ours.delete_adapter(name)
        assert torch.equal(ours(**inputs).logits, untouched)
        assert torch.equal(ours(**inputs, adapter_names=["__base__"] * len(inputs["input_ids"])).logits, untouched)


REFUSALS = [(a.name, i) for a in ARCHS for i in range(len(a.refusals))]


@pytest.mark.parametrize("arch_name,case", REFUSALS, ids=[f"{n}-{i}" for n, i in REFUSALS])
def test_unsupported_targets_are_refused_at_load(tmp_path, arch_name, case):
    arch = BY_NAME[arch_name]
    spec, message = arch.refusals[case]
    base = arch.build()
    path = save_adapter(base, tmp_path / "bad", seed=3, **spec)
    ours = MultiLoraModel(copy.deepcopy(base))
    inputs = _inputs(arch, 2)
    with torch.no_grad():
        before = ours(**inputs).logits
    with pytest.raises(TargetModuleError, match=message):
        ours.load_adapter(path, adapter_name="bad")
    assert not ours.adapters and not ours._wrappers
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, before)
