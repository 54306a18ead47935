"""The architecture zoo: a tiny seeded model per transformers family, and the PEFT adapters put on it.

Each :class:`Arch` builds its model from a config (hidden 16-32, 2 layers, vocab 96) and names
2-3 adapters of different ranks and targets. Targets are picked from the model itself (its input
embedding, the first and last linear layer names of a block, ``all-linear``), so every family gets
attention, MLP and embedding LoRA without a hand-written list that could drift from transformers.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN = VOCAB - 1
TOKENS = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
DEC = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=64, **TOKENS)


@dataclass
class Arch:
    name: str
    kind: str                           # decoder | encdec | cls | moe | vlm
    build: Callable[[], nn.Module]
    adapters: Callable[[nn.Module], dict[str, dict]] = None  # name -> LoraConfig kwargs; default: _default_adapters
    beam: bool = True                   # beam search in the generate test
    refusals: list[tuple[dict, str]] = field(default_factory=list)  # (LoraConfig kwargs, regex of the message)


def _auto(model_type: str, cls: str = "AutoModelForCausalLM", **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(model_type, **kw)
        return getattr(transformers, cls).from_config(config).eval()
    return build


def _linear_leaves(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers of the first block, in order (q/k/v/o ... mlp)."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and ".0." in n
             and not any(t in n for t in ("vision", "projector"))]
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[1] for n in names))
    return leaves


def _embedding_leaf(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb).rsplit(".", 1)[-1]


def _default_adapters(model: nn.Module) -> dict[str, dict]:
    leaves = _linear_leaves(model)
    return {
        "attn": dict(r=4, lora_alpha=8, target_modules=[leaves[0], leaves[-1]]),
        "emb_mlp": dict(r=8, lora_alpha=16, target_modules=[_embedding_leaf(model), leaves[len(leaves) // 2]], use_rslora=True),
        "all": dict(r=2, lora_alpha=8, target_modules="all-linear"),
    }


def _moe_adapters(model: nn.Module) -> dict[str, dict]:
    return {
        "experts": dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
        "down": dict(r=4, lora_alpha=8, target_modules=["v_proj", "embed_tokens"], target_parameters=["experts.down_proj"]),
        "all": dict(r=2, lora_alpha=8, target_modules="all-linear"),
    }


def _llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     image_size=8, patch_size=4, projection_dim=16),
                      text_config=LlamaConfig(**DEC), image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu",
                      vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


_LM_ONLY = r".*language_model.*\.({})"
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
           num_labels=3, vocab_size=VOCAB)
MOE = dict(DEC, hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
GEMMA = dict(DEC, num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)

ARCHS: list[Arch] = [
    Arch("llama", "decoder", _auto("llama", **DEC)),
    Arch("mistral", "decoder", _auto("mistral", **DEC)),
    Arch("qwen2", "decoder", _auto("qwen2", **DEC)),
    Arch("qwen3", "decoder", _auto("qwen3", head_dim=8, **DEC)),
    Arch("phi3", "decoder", _auto("phi3", **DEC)),  # fused qkv_proj / gate_up_proj
    Arch("gpt_neox", "decoder", _auto("gpt_neox", **DEC)),
    Arch("falcon", "decoder", _auto("falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **TOKENS)),
    Arch("opt", "decoder", _auto("opt", hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                 word_embed_proj_dim=32, max_position_embeddings=64, **TOKENS)),
    Arch("bloom", "decoder", _auto("bloom", hidden_size=32, n_layer=2, n_head=4, **TOKENS)),
    Arch("gpt2", "decoder", _auto("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOKENS),
         adapters=lambda m: {"attn": dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True),
                             "pos_mlp": dict(r=8, lora_alpha=16, target_modules=["wpe", "wte", "c_fc"], fan_in_fan_out=True),
                             "all": dict(r=2, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True)}),
    Arch("gptj", "decoder", _auto("gptj", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, **TOKENS)),
    Arch("stablelm", "decoder", _auto("stablelm", **DEC)),
    Arch("starcoder2", "decoder", _auto("starcoder2", **DEC)),
    Arch("olmo", "decoder", _auto("olmo", **DEC)),
    Arch("cohere", "decoder", _auto("cohere", **DEC)),
    Arch("gemma2", "decoder", _auto("gemma2", **GEMMA)),                 # embed_scale
    Arch("gemma3_text", "decoder", _auto("gemma3_text", **GEMMA)),       # embed_scale
    Arch("t5", "encdec", _auto("t5", "AutoModelForSeq2SeqLM", d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                               decoder_start_token_id=PAD, **TOKENS),
         refusals=[(dict(r=2, target_modules=["relative_attention_bias", "q"]), r"relative_attention_bias.*relative-position buckets")]),
    Arch("bart", "encdec", _auto("bart", "AutoModelForSeq2SeqLM", d_model=32, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                 max_position_embeddings=64, scale_embedding=True, decoder_start_token_id=EOS,
                                 forced_eos_token_id=None, **TOKENS),
         refusals=[(dict(r=2, target_modules=["embed_positions", "q_proj"]), r"embed_positions.*overrides forward")]),
    Arch("bert", "cls", _auto("bert", "AutoModelForSequenceClassification", **ENC),
         adapters=lambda m: {"attn": dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
                             "pos": dict(r=8, lora_alpha=16, target_modules=["position_embeddings", "word_embeddings", "dense"]),
                             "all": dict(r=2, target_modules="all-linear")}),
    Arch("roberta", "cls", _auto("roberta", "AutoModelForSequenceClassification", pad_token_id=1, **ENC),
         adapters=lambda m: {"head": dict(r=4, target_modules=["query"], modules_to_save=["classifier"]),
                             "dense": dict(r=2, lora_alpha=8, target_modules=["classifier.dense", "value", "word_embeddings"]),
                             "all": dict(r=2, target_modules="all-linear")}),
    Arch("mixtral", "moe", _auto("mixtral", num_local_experts=4, num_experts_per_tok=2, **MOE), adapters=_moe_adapters),
    Arch("qwen2_moe", "moe", _auto("qwen2_moe", moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=4,
                                   num_experts_per_tok=2, **MOE), adapters=_moe_adapters),
    Arch("qwen3_moe", "moe", _auto("qwen3_moe", moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2, head_dim=8, **MOE),
         adapters=_moe_adapters),
    Arch("llava", "vlm", _llava, beam=False,
         adapters=lambda m: {"lm": dict(r=4, lora_alpha=16, target_modules=_LM_ONLY.format("q_proj|v_proj|down_proj")),
                             "head": dict(r=2, lora_alpha=16, target_modules=r"(.*language_model.*\.o_proj|lm_head)"),
                             "all": dict(r=2, lora_alpha=8, target_modules="all-linear")}),  # tower + projector: per image
]


def save_adapter(base: nn.Module, path: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT adapter for ``base`` (not modified) with random non-zero A and B; modules_to_save copies perturbed."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    peft_model.save_pretrained(str(path))
    if lora_kwargs.get("modules_to_save"):  # a saved head equal to the base's would prove nothing
        file = str(path / "adapter_model.safetensors")
        tensors = load_file(file)
        g = torch.Generator().manual_seed(seed)
        for key in [k for k in tensors if "lora_" not in k and any(f".{m}." in k for m in lora_kwargs["modules_to_save"])]:
            tensors[key] = tensors[key] + 0.5 * torch.randn(tensors[key].shape, generator=g)
        save_file(tensors, file)
    return path
