"""Fused MoE experts (PEFT target_parameters / ParamWrapper) per row: parity with PEFT solo and mixed."""
from __future__ import annotations

import copy

import pytest
import torch

from lora_fixtures import VOCAB, make_adapter, peft_oracle
from loramux import AdapterConfigError, MultiLoraModel, TargetModuleError

ATOL = 1e-5


def tiny_moe(kind: str):
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **common)).eval()
    if kind == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                                  num_experts=4, num_experts_per_tok=2, **common)).eval()
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=4,
                                              num_experts_per_tok=2, head_dim=8, **common)).eval()


SPECS = {
    "both": dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    "down": dict(r=4, lora_alpha=8, target_modules=["v_proj"], target_parameters=["experts.down_proj"]),
    "all": dict(r=2, lora_alpha=8, target_modules="all-linear"),  # Mixtral/Qwen3-MoE: router (gate.weight) and experts too
}


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def moe(request, tmp_path_factory):
    base = tiny_moe(request.param)
    root = tmp_path_factory.mktemp(request.param)
    paths = {n: make_adapter(base, root / n, seed=i + 3, **s) for i, (n, s) in enumerate(SPECS.items())}
    ours = MultiLoraModel(copy.deepcopy(base))
    for n, p in paths.items():
        ours.load_adapter(p, adapter_name=n)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 7))
    with torch.no_grad():
        expected = {n: peft_oracle(base, {n: p})(input_ids=ids).logits for n, p in paths.items()}
        expected["__base__"] = base(input_ids=ids).logits
    return request.param, base, ours, paths, ids, expected


def test_experts_lora_solo_matches_peft(moe):
    kind, _, ours, paths, ids, expected = moe
    for name in paths:
        assert (expected[name] - expected["__base__"]).abs().max() > 1e-2, "the adapter must change the output"
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids, adapter_names=name).logits, expected[name], atol=ATOL, rtol=0)
    if kind != "qwen2_moe":  # PEFT converts all-linear on these to the router and the fused experts
        assert any(".mlp.gate" in m for m in ours.adapters["all"].ranks)
        assert any(".mlp.experts" in m for m in ours.adapters["all"].ranks)


def test_experts_lora_mixed_rows_match_each_adapter(moe):
    # PEFT refuses adapter_names with target_parameters: each row is compared with PEFT on that adapter alone
    _, _, ours, _, ids, expected = moe
    rows = ["both", "__base__", "all", "down"]
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=rows).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], expected[name][i], atol=ATOL, rtol=0)


def test_experts_lora_greedy_generate_mixed_equals_solo(moe):
    _, _, ours, _, _, _ = moe
    prompts = [[5, 9, 11, 3], [7, 8], [20, 21, 22]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    rows = ["both", "all", "down"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = ours.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, **kw)[:, width:]
    for i, (prompt, name) in enumerate(zip(prompts, rows)):
        solo = ours.generate(input_ids=torch.tensor([prompt]), adapter_names=[name], **kw)[0, len(prompt):]
        assert batch[i].tolist() == solo.tolist(), (i, name)


def test_merge_and_unload_folds_expert_deltas(moe, tmp_path):
    _, base, _, paths, ids, expected = moe
    ours = MultiLoraModel(copy.deepcopy(base))
    ours.load_adapter(paths["both"], adapter_name="both")
    plain = ours.merge_and_unload("both")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected["both"], atol=1e-4, rtol=0)


def test_unsupported_experts_layout_is_refused_at_load(tmp_path):
    base = tiny_moe("mixtral")
    path = make_adapter(base, tmp_path / "a", r=2, target_parameters=["experts.gate_up_proj"], target_modules=["q_proj"])
    odd = copy.deepcopy(base)
    for layer in odd.model.layers:
        layer.mlp.experts.is_transposed = True  # stands for a layout this module does not implement
    ours = MultiLoraModel(odd)
    with pytest.raises(TargetModuleError, match=r"experts.*is_transposed=True"):
        ours.load_adapter(path, adapter_name="a")
    assert not ours.adapters and not ours._wrappers


def test_add_weighted_adapter_refuses_expert_lora(moe):
    _, _, ours, _, _, _ = moe
    with pytest.raises(AdapterConfigError, match="fused-experts"):
        ours.add_weighted_adapter(["both", "down"], [0.5, 0.5], "combo", combination_type="linear")
    assert "combo" not in ours.adapters
