"""The one prompt format shared by training, eval, the demo, ``loramux generate`` and the tests.

An adapter only works on the prompt format it was trained on, so every caller goes through
``chat_prompt``: the tokenizer's chat template with the task text as the single user turn. The
answer the adapter learns is the assistant turn, ended by the template's end-of-turn token
(which is the model's eos, so greedy generation stops there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Generated:
    text: str       # decoded without special tokens, stripped
    n_tokens: int   # new tokens up to and including the end-of-turn token


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn, with the generation prompt for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   adapter_names: Sequence[str] | None = None, **generate_kwargs: Any) -> list[Generated]:
    """Answers to ``prompts`` in one left-padded batch; greedy unless ``generate_kwargs`` say otherwise.

    ``model`` is a ``MultiLoraModel`` (then ``adapter_names`` gives one adapter per row) or any
    transformers causal LM (then ``adapter_names`` must be ``None``).
    """
    import torch

    texts = [chat_prompt(tokenizer, p) for p in prompts]
    # the chat template already starts with its own special tokens
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs: dict[str, Any] = {"do_sample": False, **generate_kwargs}
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    with torch.inference_mode():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    # out: (B, T_prompt + T_new); the prompt part is the same left-padded width for every row
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    eos = tokenizer.eos_token_id
    results = []
    for row in new_tokens.tolist():
        n = row.index(eos) + 1 if eos in row else len(row)  # rows that stopped early are padded with eos
        results.append(Generated(tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n))
    return results


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                     adapter_names: Sequence[str] | None = None) -> list[str]:
    """``generate_batch`` without the token counts."""
    return [g.text for g in generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                           adapter_names=adapter_names)]
