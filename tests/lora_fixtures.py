"""Tiny seeded models built from configs, and PEFT-made adapters with non-zero B (init_lora_weights=False).

A plain module (not conftest.py): several conftest.py files live in this tree, so `from conftest import`
would be ambiguous.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96


def tiny_llama(seed: int = 0, cls=None, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return (cls or LlamaForCausalLM)(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def make_adapter(base, path: Path, seed: int = 1, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for ``base`` (not modified) with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    if lora_kwargs.get("use_dora"):
        with torch.no_grad():  # DoRA magnitudes start at ||W0||: make them differ so the test sees them
            for name, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.rand_like(p))
    if lora_kwargs.get("lora_bias"):
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    p.normal_()
    peft_model.save_pretrained(str(path))
    return path


def peft_oracle(base, adapters: dict[str, Path]):
    """A PeftModel over a copy of ``base`` with the same adapters loaded."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()
