"""Routing is data: generate on mixed left-padded batches, threads, asyncio tasks, defaults, beams."""
from __future__ import annotations

import asyncio
import copy
import threading

import pytest
import torch

from lora_fixtures import VOCAB, make_adapter, tiny_llama
from loramux import MultiLoraModel, UnknownAdapterError

NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tiny_llama(seed=5)
    root = tmp_path_factory.mktemp("routing")
    m = MultiLoraModel(base)
    specs = {"a": dict(r=4, target_modules=["q_proj", "v_proj"]), "b": dict(r=8, target_modules=["o_proj", "up_proj"]),
             "c": dict(r=2, target_modules=["down_proj", "embed_tokens"], use_rslora=True)}
    for i, (name, kw) in enumerate(specs.items()):
        m.load_adapter(make_adapter(base, root / name, seed=10 + i, lora_alpha=32, **kw), adapter_name=name)
    return m


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_greedy_generate_mixed_left_padded_equals_each_row_alone(model):
    prompts = _prompts(6)
    rows = ["a", "b", "__base__", "c", "a", "b"]
    ids, mask = _left_pad(prompts)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = model.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, **kw)[:, ids.shape[1]:]
    outputs = {tuple(batch[i].tolist()) for i in range(len(rows))}
    assert len(outputs) > 2, "adapters must change the generated tokens"
    for i, (prompt, name) in enumerate(zip(prompts, rows)):
        solo = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              adapter_names=[name], **kw)[0, len(prompt):]
        assert batch[i].tolist() == solo.tolist(), f"row {i} ({name})"


def test_beam_search_rows_follow_their_adapter(model):
    prompts = _prompts(2, seed=3)
    ids, mask = _left_pad(prompts)
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"], **kw)[:, ids.shape[1]:]
    for i, name in enumerate(["a", "b"]):
        solo = model.generate(input_ids=torch.tensor([prompts[i]]), adapter_names=[name], **kw)[0, len(prompts[i]):]
        assert batch[i].tolist() == solo.tolist()


def _solo_logits(model, ids):
    with torch.no_grad():
        return {name: model(input_ids=ids, adapter_names=[name] * len(ids)).logits for name in NAMES + ["__base__"]}


def test_threads_each_get_their_own_adapter(model):
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12))
    expected = _solo_logits(model, ids)
    errors: list[str] = []

    def worker(k: int) -> None:
        for step in range(6):
            name = (NAMES + ["__base__"])[(k + step) % 4]
            with torch.no_grad():
                if step % 2:
                    with model.adapter(name):  # context-local default
                        got = model(input_ids=ids).logits
                else:
                    got = model(input_ids=ids, adapter_names=[name, name]).logits
            if not torch.allclose(got, expected[name], atol=1e-6):
                errors.append(f"thread {k} step {step}: {name}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_asyncio_tasks_have_their_own_context_default(model):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, 6))
    expected = _solo_logits(model, ids)

    async def task(name: str) -> bool:
        with model.adapter(name):
            await asyncio.sleep(0.01)  # let the other tasks enter their own blocks
            with torch.no_grad():
                return torch.allclose(model(input_ids=ids).logits, expected[name], atol=1e-6)

    async def main():
        return await asyncio.gather(*(task(n) for n in NAMES * 3))

    assert all(asyncio.run(main()))


def test_defaults_precedence_and_o1_set_adapter(model):
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, 6))
    expected = _solo_logits(model, ids)
    with torch.no_grad():
        try:
            model.set_adapter("b")
            assert torch.allclose(model(input_ids=ids).logits, expected["b"])
            with model.adapter("c"):
                assert torch.allclose(model(input_ids=ids).logits, expected["c"])
                assert torch.allclose(model(input_ids=ids, adapter_names=["a"]).logits, expected["a"])
            with model.adapter(None):
                assert torch.allclose(model(input_ids=ids).logits, expected["__base__"])
        finally:
            model.set_adapter(None)
        assert torch.allclose(model(input_ids=ids).logits, expected["__base__"])
    with pytest.raises(UnknownAdapterError, match="'nope'.*loaded: \\['a', 'b', 'c'\\]"):
        model.set_adapter("nope")


def test_no_active_adapter_attribute_on_modules(model):
    # routing state lives in the call's context, never on modules
    for module in model.base_model.modules():
        assert not hasattr(module, "active_adapter")


# ---------------------------------------------------------------- embeddings without a batch axis (issue 10 item 2)
def test_gpt2_wpe_position_ids_without_batch_axis_route_per_row(tmp_path):
    """GPT-2's wpe gets (1, T) position ids broadcast over the batch: mixed rows (and beams) still get their own."""
    from lora_fixtures import peft_oracle, tiny_gpt2

    base = tiny_gpt2()
    paths = {"wpe": make_adapter(base, tmp_path / "wpe", seed=3, r=4, lora_alpha=16, target_modules=["wpe"]),
             "both": make_adapter(base, tmp_path / "both", seed=4, r=2, lora_alpha=16, target_modules=["wpe", "wte"])}
    m = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        m.load_adapter(path, adapter_name=name)
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (4, 7))
    rows = ["wpe", "__base__", "both", "wpe"]
    with torch.no_grad():
        mixed = m(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            expected = (base(input_ids=ids[i:i + 1]) if name == "__base__"
                        else peft_oracle(base, {name: paths[name]})(input_ids=ids[i:i + 1])).logits
            torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=0)
    prompts = _prompts(3, seed=7)
    ids, mask = _left_pad(prompts)
    for kw in (dict(max_new_tokens=5, do_sample=False), dict(max_new_tokens=4, num_beams=3, do_sample=False)):
        kw.update(pad_token_id=0, eos_token_id=None)
        batch = m.generate(input_ids=ids, attention_mask=mask, adapter_names=["wpe", "both", "__base__"], **kw)[:, ids.shape[1]:]
        for i, name in enumerate(["wpe", "both", "__base__"]):
            solo = m.generate(input_ids=torch.tensor([prompts[i]]), adapter_names=[name], **kw)[0, len(prompts[i]):]
            assert batch[i].tolist() == solo.tolist(), (kw, i, name)


def test_bert_position_embeddings_mixed_rows_match_peft(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from lora_fixtures import peft_oracle

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=32, max_position_embeddings=64, num_labels=3)).eval()
    paths = {"pos": make_adapter(base, tmp_path / "pos", seed=5, r=4, lora_alpha=16, target_modules=["position_embeddings", "query"]),
             "tok": make_adapter(base, tmp_path / "tok", seed=6, r=2, lora_alpha=16, target_modules=["word_embeddings"])}
    m = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        m.load_adapter(path, adapter_name=name)
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (3, 9))
    rows = ["tok", "pos", "__base__"]
    with torch.no_grad():
        mixed = m(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            expected = (base(input_ids=ids[i:i + 1]) if name == "__base__"
                        else peft_oracle(base, {name: paths[name]})(input_ids=ids[i:i + 1])).logits
            torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=0)


def test_embeddings_that_cannot_route_per_row_are_refused_at_load(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    from loramux import TargetModuleError

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                             decoder_start_token_id=0)).eval()
    bart = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                                   decoder_ffn_dim=32, max_position_embeddings=64)).eval()
    cases = [(t5, "relative_attention_bias", r"relative_attention_bias.*relative-position buckets"),
             (bart, "embed_positions", r"embed_positions.*BartLearnedPositionalEmbedding overrides forward")]
    for base, target, message in cases:
        m = MultiLoraModel(copy.deepcopy(base))
        path = make_adapter(base, tmp_path / target, r=2, target_modules=[target, "q" if base is t5 else "q_proj"])
        with pytest.raises(TargetModuleError, match=message):
            m.load_adapter(path, adapter_name="x")
        assert not m.adapters and not m._wrappers  # nothing changed


# ---------------------------------------------------------------- vision-language model (issue 10 item 3)
IMAGE_TOKEN = VOCAB - 1


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     image_size=8, patch_size=4, projection_dim=16),
                      text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                              eos_token_id=2),
                      image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


def _llava_batch():
    """3 rows, images (4 tokens each, 8x8 pixels) in rows 0 and 2 only: pixel_values has 2 entries, not 3."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB - 5, (3, 9), generator=g)
    ids[0, 1:5] = IMAGE_TOKEN
    ids[2, 3:7] = IMAGE_TOKEN
    return ids, torch.randn(2, 3, 8, 8, generator=g), {0: 0, 2: 1}


def test_llava_language_model_adapters_whatever_rows_carry_images(tmp_path):
    from lora_fixtures import peft_oracle

    base = tiny_llava()
    paths = {"lm": make_adapter(base, tmp_path / "lm", seed=31, r=4, lora_alpha=16,
                                target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"),
             "head": make_adapter(base, tmp_path / "head", seed=32, r=2, lora_alpha=16,
                                  target_modules=r"(.*language_model.*\.o_proj|lm_head)")}
    m = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        m.load_adapter(path, adapter_name=name)
    ids, pixels, image_of_row = _llava_batch()
    for rows in (["lm", "head", "__base__"], ["__base__", "lm", "head"], ["lm", "lm", "lm"]):
        with torch.no_grad():
            mixed = m(input_ids=ids, pixel_values=pixels, adapter_names=rows).logits
            for i, name in enumerate(rows):
                kw = {"pixel_values": pixels[image_of_row[i]:image_of_row[i] + 1]} if i in image_of_row else {}
                model = base if name == "__base__" else peft_oracle(base, {name: paths[name]})
                expected = model(input_ids=ids[i:i + 1], **kw).logits
                torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=0, msg=lambda s: f"{rows} row {i}: {s}")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = m.generate(input_ids=ids, pixel_values=pixels, adapter_names=["lm", "__base__", "head"], **kw)[:, ids.shape[1]:]
    for i, name in enumerate(["lm", "__base__", "head"]):
        extra = {"pixel_values": pixels[image_of_row[i]:image_of_row[i] + 1]} if i in image_of_row else {}
        solo = m.generate(input_ids=ids[i:i + 1], adapter_names=[name], **extra, **kw)[0, ids.shape[1]:]
        assert batch[i].tolist() == solo.tolist(), (i, name)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*multi_modal_projector\.linear_1", "all-linear"])
def test_llava_tower_and_projector_adapters_route_by_image_tokens(tmp_path, targets):
    """The tower's batch axis counts images (2 here, for 3 rows): image i follows the row holding its tokens."""
    from lora_fixtures import peft_oracle

    base = tiny_llava()
    paths = {"v": make_adapter(base, tmp_path / "v", seed=33, r=4, lora_alpha=16, target_modules=targets),
             "lm": make_adapter(base, tmp_path / "lm", seed=34, r=2, lora_alpha=16, target_modules=r".*language_model.*\.v_proj")}
    m = MultiLoraModel(copy.deepcopy(base))
    for name, path in paths.items():
        m.load_adapter(path, adapter_name=name)
    assert any(w.in_tower for w in m._wrappers.values())
    ids, pixels, image_of_row = _llava_batch()
    for rows in (["v", "lm", "__base__"], ["__base__", "v", "v"], ["lm", "__base__", "v"]):
        with torch.no_grad():
            mixed = m(input_ids=ids, pixel_values=pixels, adapter_names=rows).logits
            for i, name in enumerate(rows):
                kw = {"pixel_values": pixels[image_of_row[i]:image_of_row[i] + 1]} if i in image_of_row else {}
                model = base if name == "__base__" else peft_oracle(base, {name: paths[name]})
                expected = model(input_ids=ids[i:i + 1], **kw).logits
                if name == "v" and i in image_of_row:
                    assert not torch.allclose(expected, base(input_ids=ids[i:i + 1], **kw).logits, atol=1e-4)
                torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=0, msg=lambda s: f"{rows} row {i}: {s}")


def test_tower_adapters_of_multimodal_families_without_image_routing_are_refused_at_load(tmp_path):
    from loramux import TargetModuleError

    base = tiny_llava()
    path = make_adapter(base, tmp_path / "v", r=2, target_modules=["q_proj", "v_proj"])
    base.model.config.model_type = "some_other_vlm"  # stands for a family whose image -> row pairing is not known
    m = MultiLoraModel(copy.deepcopy(base))
    with pytest.raises(TargetModuleError, match=r"part of 'model.vision_tower', a vision/audio tower"):
        m.load_adapter(path, adapter_name="v")
    assert not m.adapters and not m._wrappers
