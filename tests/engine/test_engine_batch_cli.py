"""`loramux generate --batch`: JSONL in, JSONL out in input order, bad lines reported, others served."""
from __future__ import annotations

import argparse
import json

from engine_helpers import CharTokenizer
from loramux.commands import generate


def test_batch_mode_writes_results_in_input_order(llama_model, llama_adapters, tmp_path):
    lines = [
        {"prompt": "abc", "adapter": llama_adapters["a"], "max_tokens": 5, "raw": True, "ignore_eos": True},
        {"id": "mine", "prompt": "hello", "adapter": "__base__", "max_tokens": 3, "raw": True, "ignore_eos": True},
        {"prompt": "x", "adapter": str(tmp_path / "missing"), "raw": True},
        {"prompt": "zz", "adapter": llama_adapters["b"], "temperature": 0.8, "seed": 3, "max_tokens": 4, "raw": True,
         "ignore_eos": True},
    ]
    src = tmp_path / "requests.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(["--batch", str(src), "--output", str(tmp_path / "out.jsonl"), "--max-running", "2"])
    code = _run(args, llama_model)
    assert code == 0
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["line-1", "mine", "line-3", "line-4"]
    assert [o["finish_reason"] for o in out] == ["length", "length", "error", "length"]
    assert [o["completion_tokens"] for o in out] == [5, 3, 0, 4]
    assert "neither a bundled adapter" in out[2]["error"]
    assert out[0]["prompt_tokens"] == 4 and out[0]["text"]  # raw text gets the tokenizer's BOS


def _run(args, model):
    from loramux.commands.generate_batch import run_batch

    return run_batch(args, lambda a: (model, CharTokenizer()), generate._resolve_adapter)
