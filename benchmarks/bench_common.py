"""What the benchmark scripts share: the model under test, its adapters, RSS, and BENCHMARKS.md sections.

Every benchmark measures the same thing on purpose: a Llama with SmolLM2-135M's shape (the embedded
default model's shape, random weights) and PEFT adapters saved by PEFT itself, so that the
figures of different scripts can be read side by side.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MD_PATH = ROOT / "BENCHMARKS.md"
RANKS = (8, 16, 32, 64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(seed: int = 0):
    """SmolLM2-135M's shape from a config: 30 layers, hidden 576, 9/3 heads, tied embeddings; fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).to(torch.float32).eval()


def make_peft_adapters(base, root: Path, count: int) -> list[tuple[str, Path, int]]:
    """``count`` PEFT adapters ``a<i>`` (ranks cycling 8/16/32/64, alpha 2r, all 7 projections,
    random non-zero A and B), written by PEFT's ``save_pretrained`` to ``root/a<i>``.

    Returns (name, directory, rank) per adapter.
    """
    from peft import LoraConfig, get_peft_model

    def config(i: int) -> LoraConfig:
        rank = RANKS[i % len(RANKS)]
        torch.manual_seed(100 + i)  # PEFT draws the adapter's A and B when it is added
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0,
                          init_lora_weights=False)

    peft_model = get_peft_model(copy.deepcopy(base), config(0), adapter_name="a0")
    for i in range(1, count):
        peft_model.add_adapter(f"a{i}", config(i))
    peft_model.save_pretrained(str(root))  # a non-"default" adapter goes to root/<adapter_name>
    del peft_model
    return [(f"a{i}", root / f"a{i}", RANKS[i % len(RANKS)]) for i in range(count)]


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    """/proc/cpuinfo's text, read once ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def machine() -> str:
    """The CPU the figures come from ("Intel(R) Xeon(R) Processor, AVX512"): the same script gives other ratios on
    another CPU (MKL, the kernels' ISA, cache sizes), and the development machine has changed between runs."""
    import platform

    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                platform.machine())
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def has_cpu_flag(flag: str) -> bool:
    """Whether /proc/cpuinfo lists ``flag`` (e.g. "amx_tile") for this CPU; False where it cannot tell."""
    return any(line.startswith("flags") and flag in line.split() for line in _cpuinfo().splitlines())


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_section(start: str, end: str, section: str, path: Path = MD_PATH) -> None:
    """Replace only the text between ``start`` and ``end`` in BENCHMARKS.md (appending the section if
    the markers are missing): each benchmark owns its section and leaves the others alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
