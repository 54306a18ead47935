"""Fixtures of the server tests: a tiny base model directory with PEFT adapters (built once per
session), a fake engine for error paths, and the app around either."""
from __future__ import annotations

import json
import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """``base/`` (model + tokenizer); ``root/a0..a7`` (adapters); ``runtime/`` (a second root for
    runtime loading: ``good``, ``corrupt`` (truncated weights) and ``link_out``, a symlink to
    ``outside/evil``, an adapter outside every root)."""
    import torch

    import srv_tiny

    torch.set_num_threads(1)
    top = tmp_path_factory.mktemp("server_world")
    model, tokenizer = srv_tiny.build_base(top / "base")
    adapters = srv_tiny.make_adapters(model, top / "root", 8)
    outside = srv_tiny.make_adapter(model, top / "outside" / "evil", seed=7, r=4, target_modules=["q_proj"])
    runtime = top / "runtime"
    good = srv_tiny.make_adapter(model, runtime / "good", seed=8, r=4, target_modules=["q_proj", "v_proj"])
    corrupt = runtime / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapters["a0"] / "adapter_config.json").read_text())
    weights = (adapters["a0"] / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 3])
    os.symlink(outside, runtime / "link_out")
    # runtime/: adapters that read fine but do not fit this base (full validation must refuse them)
    other_base, _ = srv_tiny.build_base(top / "other_base", hidden=48)
    srv_tiny.make_adapter(other_base, runtime / "other_model", seed=9, r=4, target_modules=["q_proj", "v_proj"])
    mts = srv_tiny.make_adapter(model, runtime / "mts_no_weights", seed=10, r=4, target_modules=["q_proj"])
    config = json.loads((mts / "adapter_config.json").read_text())
    (mts / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    # broken/: adapters that fail on first use from an adapter root (each must be a 400 naming the problem)
    broken = top / "broken"
    for name, edit in {"bad_json": lambda c: "{not json", "bad_regex": lambda c: json.dumps({**c, "target_modules": "q_proj[("}),
                       "nan_alpha": lambda c: json.dumps({**c, "lora_alpha": float("nan")})}.items():
        (broken / name).mkdir(parents=True)
        config = (adapters["a0"] / "adapter_config.json").read_text()
        (broken / name / "adapter_config.json").write_text(edit(json.loads(config)))
        (broken / name / "adapter_model.safetensors").write_bytes((adapters["a0"] / "adapter_model.safetensors").read_bytes())
    return {"top": top, "base": top / "base", "root": top / "root", "runtime": runtime, "adapters": adapters,
            "outside": outside, "good": good, "corrupt": corrupt, "model": model, "tokenizer": tokenizer,
            "broken": broken}


class Oracle:
    """What ``MultiLoraModel.generate`` answers for one prompt and adapter, alone, greedily."""

    def __init__(self, world) -> None:
        from loramux import MultiLoraModel
        from loramux.base import load_base

        model, self.tokenizer = load_base(str(world["base"]))
        self.model = MultiLoraModel(model)
        for name, path in world["adapters"].items():
            self.model.load_adapter(str(path), adapter_name=name)
        self.model.load_adapter(str(world["good"]), adapter_name="good")
        self.eos = self.tokenizer.eos_token_id
        self._memo: dict = {}

    def prompt_ids(self, prompt) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else list(self.tokenizer(prompt)["input_ids"])

    def chat_ids(self, messages) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"])

    def text(self, ids: list[int], adapter: str | None, max_new: int) -> str:
        import torch

        key = (tuple(ids), adapter, max_new)
        if key not in self._memo:
            x = torch.tensor([ids])
            with torch.inference_mode():
                out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[adapter],
                                          max_new_tokens=max_new, do_sample=False, eos_token_id=self.eos,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = out[0, len(ids):].tolist()
            if self.eos in new:
                new = new[: new.index(self.eos)]
            self._memo[key] = self.tokenizer.decode(new, skip_special_tokens=True)
        return self._memo[key]

    def greedy_ids(self, ids: list[int], adapter: str | None, max_new: int) -> list[int]:
        """The greedy continuation's token ids (EOS included when it came)."""
        import torch

        x = torch.tensor([ids])
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[adapter],
                                      max_new_tokens=max_new, do_sample=False, eos_token_id=self.eos,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return out[0, len(ids):].tolist()

    def logprobs(self, ids: list[int], adapter: str | None, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """For every position after the first: (logprob of ids[j], top-k (id, logprob)), from the raw logits."""
        import torch

        x = torch.tensor([ids])
        with torch.inference_mode():
            logits = self.model(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[adapter]).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
        out = []
        for j in range(1, len(ids)):
            values, top = logp[j - 1].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
            out.append((float(logp[j - 1, ids[j]]), list(zip(top.tolist(), values.tolist()))))
        return out

    def completion(self, prompt, adapter: str | None, max_new: int) -> str:
        return self.text(self.prompt_ids(prompt), adapter, max_new)

    def chat(self, messages, adapter: str | None, max_new: int) -> str:
        return self.text(self.chat_ids(messages), adapter, max_new)


@pytest.fixture(scope="session")
def oracle(tiny_world):
    return Oracle(tiny_world)
