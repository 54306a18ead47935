"""Train the bundled task adapters with PEFT on the embedded default base model (CPU is enough).

    python examples/train_adapters.py                 # all tasks, the recorded settings
    python examples/train_adapters.py --tasks json    # one task

One LoRA per task in ``loramux.tasks``, trained on that task's *training* split only (fresh seeded
examples every step), the loss masked to the answer and its end-of-turn token. Ranks, alphas and
target modules differ between adapters on purpose, so that the bundled set exercises
heterogeneous mixed batches. Each adapter is saved in PEFT format (``adapter_config.json`` +
``adapter_model.safetensors``, weights stored as float16 to keep the package small) into
``src/loramux/adapters/<task>/`` with a ``TRAINING.md`` that records the command, seed, steps, time
and a quick held-out score measured with PEFT. ``loramux eval`` gives the full matrix.

PEFT is a dev dependency (``pip install -e '.[dev]'``); the library itself never imports it.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from loramux.base import load_base
from loramux.tasks import TASKS, chat_prompt, generate_answers, is_correct

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF is a quantisation of
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "loramux" / "adapters"


@dataclass(frozen=True)
class Recipe:
    """How one task's adapter is trained; differing on purpose between tasks."""

    rank: int
    alpha: int
    targets: tuple[str, ...]
    steps: int
    layers: tuple[int, ...] | None = None  # None: every decoder layer
    lr: float = 2e-3
    batch_size: int = 8


RECIPES: dict[str, Recipe] = {  # in training order
    "json": Recipe(rank=8, alpha=16, targets=tuple(ATTN + MLP), steps=120),
    # the upper two thirds of the layers only: backward stops at layer 10, and it exercises sparse adapters
    "date": Recipe(rank=8, alpha=16, targets=("q_proj", "v_proj", "up_proj", "down_proj"), steps=40,
                   layers=tuple(range(10, 30)), lr=3e-3),
    "sql": Recipe(rank=16, alpha=32, targets=tuple(ATTN), steps=40, lr=3e-3),
    "reverse": Recipe(rank=8, alpha=16, targets=tuple(ATTN) + ("up_proj", "down_proj"), steps=160, lr=3e-3),
}


def encode(tokenizer, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) ids with labels = -100 everywhere but the answer and its end token."""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers):
        p_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def answer_loss(peft_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the answer tokens only, projecting only those positions to the vocabulary.

    The same loss as ``model(**batch).loss``, but the (B, T, vocab=49152) logits of the prompt
    tokens are never computed: on 2 CPU cores that projection is a fifth of the step.
    """
    causal_lm = peft_model.get_base_model()
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # hidden: (B, T, d); position t predicts token t+1
    targets = batch["labels"][:, 1:]                        # (B, T-1)
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])         # (N_answer, d) -> (N_answer, vocab)
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up over 5 steps, then cosine decay to 10% of the peak."""
    if step < 5:
        return recipe.lr * (step + 1) / 5
    progress = (step - 5) / max(1, recipe.steps - 5)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def quick_heldout(model, tokenizer, task, n: int, batch: int = 20) -> int:
    examples = task.examples("heldout", n, seed=0)
    correct = 0
    for i in range(0, n, batch):
        chunk = examples[i:i + batch]
        outs = generate_answers(model, tokenizer, [e.prompt for e in chunk], max_new_tokens=task.max_new_tokens)
        correct += sum(is_correct(o, e.answer) for o, e in zip(outs, chunk))
    return correct


def finalize(adapter_dir: Path) -> None:
    """Make a saved PEFT adapter fit for shipping in the package.

    Weights as float16 (half the bytes; loaders upcast to the base dtype); the base model named by
    its hub id rather than this machine's cache path; PEFT's empty model-card template removed
    (TRAINING.md says how the adapter was made).
    """
    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").unlink(missing_ok=True)


def train_one(name: str, recipe: Recipe, base_model, tokenizer, args) -> dict:
    task = TASKS[name]
    torch.manual_seed(args.seed)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.targets),
                        layers_to_transform=list(recipe.layers) if recipe.layers else None,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr, weight_decay=0.0)
    # fresh examples for every step, all from the training split's pools
    examples = task.examples("train", recipe.steps * recipe.batch_size, seed=args.seed)
    print(f"[{name}] r={recipe.rank} alpha={recipe.alpha} targets={','.join(recipe.targets)} layers={recipe.layers or 'all'} "
          f"trainable={trainable:,} steps={recipe.steps} batch={recipe.batch_size}", flush=True)
    model.train()
    start = time.perf_counter()
    for step in range(recipe.steps):
        chunk = examples[step * recipe.batch_size:(step + 1) * recipe.batch_size]
        batch = encode(tokenizer, [e.prompt for e in chunk], [e.answer for e in chunk])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == recipe.steps - 1:
            print(f"[{name}] step {step + 1}/{recipe.steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    train_s = time.perf_counter() - start
    model.eval()
    score = quick_heldout(model, tokenizer, task, args.check) if args.check else None
    out_dir = args.out / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    finalize(out_dir)
    record = {
        "task": name, "description": task.description, "seed": args.seed, **asdict(recipe),
        "trainable_parameters": trainable, "train_seconds": round(train_s, 1), "torch_threads": torch.get_num_threads(),
        "heldout_quick_check": f"{score}/{args.check}" if score is not None else None,
        "command": "python examples/train_adapters.py " + " ".join(map(shlex.quote, sys.argv[1:])),
    }
    (out_dir / "TRAINING.md").write_text(
        f"# `{name}` adapter\n\n{task.description}. Example prompt: `{task.example}`\n\n"
        f"Trained by `examples/train_adapters.py` (PEFT {_peft_version()}) on the embedded default base "
        "model (SmolLM2-135M-Instruct), training split only.\n\n```json\n"
        + json.dumps(record, indent=2) + "\n```\n")
    print(f"[{name}] trained in {train_s:.0f} s; held-out quick check {record['heldout_quick_check']}; "
          f"saved to {out_dir}", flush=True)
    model.unload()  # remove the LoRA layers: the same base model serves the next task
    return record


def _peft_version() -> str:
    import peft
    return peft.__version__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override every recipe's step count")
    parser.add_argument("--check", type=int, default=20, help="held-out prompts scored after training (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_model, tokenizer = load_base()
    for p in base_model.parameters():
        p.requires_grad_(False)
    records = []
    for name in args.tasks:
        recipe = RECIPES[name]
        if args.steps:
            recipe = Recipe(**{**asdict(recipe), "steps": args.steps})
        records.append(train_one(name, recipe, base_model, tokenizer, args))
    print(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
