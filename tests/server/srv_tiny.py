"""A tiny seeded base model directory (weights + an offline-trained tokenizer + chat template) and
PEFT adapters with non-zero B, for server tests and the load test. Nothing is downloaded."""
from __future__ import annotations

import copy
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "select name from users where age > 30",
    "Maria is 34 and lives in Lisbon.",
    "reverse the order of these words please",
    "hello world, how are you today?",
    "{\"name\": \"Ana\", \"age\": 41, \"city\": \"Porto\"}",
    "one two three four five six seven eight nine ten",
    "The capital of France is Paris.",
]


def build_tokenizer():
    """Byte-level BPE (any text encodes) trained in a few milliseconds on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_base(path: Path, seed: int = 0, hidden: int = 32):
    """Save a 2-layer Llama (hidden 32) and its tokenizer to ``path``; return (model, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2,  # peaked logits: greedy argmax is far from ties
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


# heterogeneous on purpose: ranks and targets differ between adapters
ADAPTER_SHAPES = [
    dict(r=4, target_modules=["q_proj", "v_proj"]),
    dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    dict(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]),
    dict(r=16, target_modules=["v_proj", "down_proj"], lora_alpha=32),
]


def make_adapter(base, path: Path, seed: int, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for ``base`` (left untouched) with random non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    with torch.no_grad():  # large enough B that every adapter changes greedy outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(path))
    return path


def make_adapters(base, root: Path, count: int, prefix: str = "a") -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    return {f"{prefix}{i}": make_adapter(base, root / f"{prefix}{i}", seed=100 + i, **ADAPTER_SHAPES[i % len(ADAPTER_SHAPES)])
            for i in range(count)}
