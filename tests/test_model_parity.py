"""Oracle parity with PEFT: every supported adapter feature, alone and in mixed batches (fp32, atol 1e-5)."""
from __future__ import annotations

import copy

import pytest
import torch

from lora_fixtures import VOCAB, make_adapter, peft_oracle, tiny_gpt2, tiny_llama
from loramux import MultiLoraModel

ATOL = 1e-5

LLAMA_FEATURES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "down_proj"],
                     rank_pattern={"layers.1.mlp.up_proj": 2, "down_proj": 6}, alpha_pattern={"q_proj": 3}),
    "regex": dict(r=4, target_modules=r".*\.(gate_proj|down_proj)"),
    "all_linear_exclude": dict(r=2, target_modules="all-linear", exclude_modules=["k_proj", "gate_proj"]),
    "layers": dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "embedding": dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "v_proj"]),
    "lora_bias": dict(r=4, target_modules=["q_proj", "down_proj"], lora_bias=True),
    "dora": dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
}


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    base = tiny_llama()
    root = tmp_path_factory.mktemp("llama_adapters")
    paths = {name: make_adapter(base, root / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(LLAMA_FEATURES.items())}
    oracle = peft_oracle(base, paths)
    ours = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        ours.load_adapter(path, adapter_name=name)
    return ours, oracle


def _ids(batch: int, seq: int = 10, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq))


@pytest.mark.parametrize("name", list(LLAMA_FEATURES))
def test_llama_single_adapter_matches_peft(llama_setup, name):
    ours, oracle = llama_setup
    ids = _ids(3)
    oracle.set_adapter(name)
    with torch.no_grad():
        expected = oracle(input_ids=ids).logits
        got = ours(input_ids=ids, adapter_names=[name] * 3).logits
        base_logits = ours(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3), "adapter must change the output, or the test proves nothing"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_llama_mixed_batch_matches_peft_adapter_names(llama_setup):
    ours, oracle = llama_setup
    names = [n for n in LLAMA_FEATURES if n != "dora"]  # PEFT refuses DoRA in mixed batches
    rows = names + ["__base__"] + names[::-1]
    ids = _ids(len(rows), seed=1)
    with torch.no_grad():
        expected = oracle(input_ids=ids, adapter_names=rows).logits
        got = ours(input_ids=ids, adapter_names=rows).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_dora_rows_in_mixed_batch_equal_solo_runs(llama_setup):
    ours, _ = llama_setup
    rows = ["dora", "plain", "dora", "__base__", "embedding", "dora"]
    ids = _ids(len(rows), seed=2)
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            solo = ours(input_ids=ids[i:i + 1], adapter_names=[name]).logits
            torch.testing.assert_close(mixed[i:i + 1], solo, atol=ATOL, rtol=0)


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tmp_path):
    base = tiny_gpt2()
    paths = {
        "attn": make_adapter(base, tmp_path / "attn", seed=3, r=4, target_modules=["c_attn"], fan_in_fan_out=True),
        "mlp": make_adapter(base, tmp_path / "mlp", seed=4, r=8, lora_alpha=4, target_modules=["c_fc", "c_proj"],
                            fan_in_fan_out=True),
        "dora": make_adapter(base, tmp_path / "dora", seed=5, r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
    }
    oracle = peft_oracle(base, paths)
    ours = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        ours.load_adapter(path, adapter_name=name)
    ids = _ids(5, seed=3)
    rows = ["attn", "mlp", "__base__", "mlp", "attn"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, adapter_names=rows).logits,
                                   oracle(input_ids=ids, adapter_names=rows).logits, atol=ATOL, rtol=0)
        oracle.set_adapter("dora")
        torch.testing.assert_close(ours(input_ids=ids, adapter_names="dora").logits, oracle(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)


def test_modules_to_save_sequence_classification_mixed(tmp_path):
    from transformers import LlamaForSequenceClassification

    base = tiny_llama(cls=LlamaForSequenceClassification, num_labels=3)
    paths = {
        "cls1": make_adapter(base, tmp_path / "c1", seed=6, r=4, target_modules=["q_proj"], task_type="SEQ_CLS"),
        "cls2": make_adapter(base, tmp_path / "c2", seed=7, r=2, target_modules=["v_proj"], task_type="SEQ_CLS"),
    }
    for path in paths.values():  # a head that differs from the base's, or the test proves nothing
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(path / "adapter_model.safetensors"))
        assert "base_model.model.score.weight" in tensors
        tensors["base_model.model.score.weight"] = torch.randn_like(tensors["base_model.model.score.weight"])
        save_file(tensors, str(path / "adapter_model.safetensors"))
    oracle = peft_oracle(base, paths)
    ours = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        assert ours.load_adapter(path, adapter_name=name).modules_to_save == ("score",)
    ids = _ids(4, seed=4)
    rows = ["cls1", "cls2", "__base__", "cls1"]
    with torch.no_grad():
        got = ours(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            if name == "__base__":
                with oracle.disable_adapter():
                    expected = oracle(input_ids=ids[i:i + 1]).logits
            else:
                oracle.set_adapter(name)
                expected = oracle(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- scaled embeddings (issue 10 item 1)
def _tiny_scaled(kind: str):
    torch.manual_seed(0)
    if kind == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM
        return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)).eval()
    if kind == "gemma3_text":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig
        return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)).eval()
    from transformers import BartConfig, BartForConditionalGeneration
    return BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                                   decoder_ffn_dim=32, max_position_embeddings=64, scale_embedding=True)).eval()


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "bart"])
def test_scaled_embedding_lora_matches_peft(tmp_path, kind):
    base = _tiny_scaled(kind)
    scale = base.get_input_embeddings().embed_scale
    assert float(scale) > 1.5, "the test needs an embedding that scales its output"
    paths = {"emb": make_adapter(base, tmp_path / "emb", seed=11, r=4, lora_alpha=8, target_modules=["embed_tokens"]),
             "mix": make_adapter(base, tmp_path / "mix", seed=12, r=2, target_modules=["embed_tokens", "q_proj"])}
    ours = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        ours.load_adapter(path, adapter_name=name)
    assert ours.base_model.get_input_embeddings().embed_scale is not None  # attributes pass through the wrapper
    ids = _ids(3, seed=5)
    kw = {"decoder_input_ids": _ids(3, seq=6, seed=6)} if kind == "bart" else {}
    rows = ["emb", "__base__", "mix"]
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=rows, **kw).logits
        for i, name in enumerate(rows):
            row_kw = {k: v[i:i + 1] for k, v in kw.items()}
            if name == "__base__":
                expected = base(input_ids=ids[i:i + 1], **row_kw).logits
            else:
                expected = peft_oracle(base, {name: paths[name]})(input_ids=ids[i:i + 1], **row_kw).logits
                assert not torch.allclose(expected, base(input_ids=ids[i:i + 1], **row_kw).logits, atol=1e-3)
            torch.testing.assert_close(mixed[i:i + 1], expected, atol=ATOL, rtol=0)


def test_wrapper_passes_through_attributes_of_the_wrapped_layer(tmp_path):
    base = tiny_llama()
    ours = MultiLoraModel(copy.deepcopy(base))
    ours.load_adapter(make_adapter(base, tmp_path / "a", r=2, target_modules=["embed_tokens", "q_proj"]), adapter_name="a")
    emb = ours.base_model.get_input_embeddings()
    assert (emb.padding_idx, emb.num_embeddings, emb.embedding_dim) == (0, VOCAB, 32)
    q = ours.base_model.model.layers[0].self_attn.q_proj
    assert (q.in_features, q.out_features) == (32, 32)
    with pytest.raises(AttributeError):
        q.no_such_attribute


# ---------------------------------------------------------------- modules_to_save and LoRA in one module (issue 10 item 4)
def _perturb_saved(path, prefix: str) -> None:
    """Give a saved modules_to_save copy weights that differ from the base's, or the test proves nothing."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    keys = [k for k in tensors if k.startswith("base_model.model." + prefix + ".") and "lora_" not in k]
    assert keys, f"no saved {prefix} weights"
    g = torch.Generator().manual_seed(len(keys))
    for k in keys:
        tensors[k] = tensors[k] + 0.5 * torch.randn(tensors[k].shape, generator=g)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _per_adapter_parity(base, paths: dict, order: list[str], ids: torch.Tensor) -> None:
    ours = MultiLoraModel(copy.deepcopy(base))
    for name in order:
        ours.load_adapter(paths[name], adapter_name=name)
    rows = (order + ["__base__"] + order)[: len(ids)]
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            expected = (base(input_ids=ids[i:i + 1]) if name == "__base__"
                        else peft_oracle(base, {name: paths[name]})(input_ids=ids[i:i + 1])).logits
            if name != "__base__":
                assert not torch.allclose(expected, base(input_ids=ids[i:i + 1]).logits, atol=1e-3)
            torch.testing.assert_close(mixed[i:i + 1], expected, atol=ATOL, rtol=0, msg=lambda m: f"{order} row {i} {name}: {m}")
    for name in order:
        ours.delete_adapter(name)
    fresh = MultiLoraModel(copy.deepcopy(base))  # the same base linears (dense_kernel: not MKL's rounding)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, fresh(input_ids=ids).logits)


@pytest.mark.parametrize("order", [["head", "dense"], ["dense", "head"]])
def test_modules_to_save_head_and_lora_inside_it_both_orders(tmp_path_factory, order):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tmp = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    base = RobertaForSequenceClassification(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=32, max_position_embeddings=64, num_labels=3,
                                                          pad_token_id=1)).eval()
    paths = {"head": make_adapter(base, tmp / "head", seed=21, r=4, target_modules=["query"], modules_to_save=["classifier"]),
             "dense": make_adapter(base, tmp / "dense", seed=22, r=2, lora_alpha=8, target_modules=["classifier.dense", "value"])}
    _perturb_saved(paths["head"], "classifier")
    _per_adapter_parity(base, paths, order, torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("order", [["lora_head", "saved_head"], ["saved_head", "lora_head"]])
def test_lm_head_lora_for_one_adapter_modules_to_save_for_another(tmp_path_factory, order):
    tmp = tmp_path_factory.mktemp("lm_head")
    base = tiny_llama()
    paths = {"lora_head": make_adapter(base, tmp / "l", seed=23, r=4, lora_alpha=16, target_modules=["lm_head", "q_proj"]),
             "saved_head": make_adapter(base, tmp / "s", seed=24, r=2, target_modules=["v_proj"], modules_to_save=["lm_head"])}
    _perturb_saved(paths["saved_head"], "lm_head")
    _per_adapter_parity(base, paths, order, _ids(5, seed=8))


def test_same_module_as_lora_and_modules_to_save_of_one_adapter_is_refused(tmp_path):
    from loramux import TargetModuleError

    base = tiny_llama()
    path = make_adapter(base, tmp_path / "both", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(2, 32)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(VOCAB, 2)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    ours = MultiLoraModel(copy.deepcopy(base))
    with pytest.raises(TargetModuleError, match=r"'lm_head' is both a LoRA target and in modules_to_save"):
        ours.load_adapter(path, adapter_name="both")
    assert not ours.adapters
