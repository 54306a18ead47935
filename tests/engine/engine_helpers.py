"""Tiny seeded models, PEFT adapters with non-zero B, a toy tokenizer, and the solo-run oracle."""
from __future__ import annotations

import copy
import warnings

import torch

warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96
EOS = 2


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=EOS)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=EOS)).eval()


def save_adapter(base, path, seed: int, targets, **lora_kwargs) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # strong enough that every adapter visibly changes the greedy output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(str(path))
    return str(path)


class CharTokenizer:
    """Token id i >= 3 is the character chr(ord('a') + (i - 3) % 26); 0/1/2 are pad/bos/eos."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [1] * add_special_tokens + [3 + (ord(c) - ord("a")) % 26 for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i >= 3 or not skip_special_tokens)


def solo_greedy(model, prompt: list[int], adapter: str | None, max_new: int) -> list[int]:
    """The oracle: one request alone through MultiLoraModel.generate (loads the adapter if needed)."""
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         adapter_names=[adapter or "__base__"], max_new_tokens=max_new, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


GUARD_S = 600.0  # an overall guard against a hang, never a race: loops end by their condition


def wait_for_progress(engine) -> None:
    """After a step that could not run (only adapter loads pending): sleep until the engine is
    notified (a load ended, a submission or cancel arrived), re-checking every 50 ms."""
    with engine._wake:
        engine._wake.wait(0.05)


def step_until(engine, condition, what: str = "the condition") -> None:
    """Step the engine by hand until ``condition()`` holds."""
    import time

    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {GUARD_S:.0f} s"
        if not engine.step():
            wait_for_progress(engine)


def run_all(engine, handles):
    """Drive the engine by hand until every handle finished."""
    step_until(engine, lambda: all(h.finished for h in handles), "every request finishing")
    return [h.result() for h in handles]
