"""`loramux inspect`: reads an adapter without a model; a bad one exits 1 with the loader's message."""
from __future__ import annotations

from lora_fixtures import make_adapter, tiny_llama
from loramux.cli import main


def test_inspect_lists_modules_and_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    path = make_adapter(tiny_llama(), tmp_path / "a", r=4, lora_alpha=16, target_modules=["q_proj"], use_dora=True)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in out and "DoRA" in out and "magnitude" in out and "4" in out


def test_inspect_bad_directory_exits_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "AdapterNotFoundError" in capsys.readouterr().out
