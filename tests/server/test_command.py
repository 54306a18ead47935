"""``loramux serve`` flags: wrong ones fail at once with exit 2 and a message, before any model loads."""
from __future__ import annotations

import logging

import pytest

from loramux.cli import main
from loramux.server.command import base_model_name


def test_runtime_loading_without_a_root_is_refused_before_loading(caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--allow-runtime-loading"]) == 2
    assert "--adapter-root" in caplog.text


def test_missing_adapter_root_and_bad_port_are_refused(caplog, tmp_path):
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--adapter-root", str(tmp_path / "nope")]) == 2
        assert main(["serve", "--port", "70000"]) == 2
    assert "nope" in caplog.text and "70000" in caplog.text


@pytest.mark.parametrize("argv", [["serve", "--adapter", "no-equals-sign"], ["serve", "--max-running", "0"]])
def test_malformed_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "serve" in capsys.readouterr().err


def test_base_model_names():
    assert base_model_name(None) == "SmolLM2-135M-Instruct"
    assert base_model_name("/models/tiny-llama/") == "tiny-llama"
    assert base_model_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"


def test_preload_adapters_loads_in_registry_order_within_the_limits_and_stays_evictable(tiny_world, caplog):
    """``--preload-adapters``: registered adapters are resident before the first request, up to
    ``--max-loaded-adapters``; a broken one is logged by name and skipped; the cache still evicts them."""
    import argparse

    from loramux.engine import SamplingParams
    from loramux.server.command import add_arguments, build_engine

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--base", str(tiny_world["base"]), "--adapter-root", str(tiny_world["root"]),
                              "--adapter", f"broken={tiny_world['corrupt']}", "--preload-adapters",
                              "--max-loaded-adapters", "3", "--threads", "1"])
    with caplog.at_level(logging.WARNING):
        engine, _, registry = build_engine(args)
    try:
        assert registry.names()[:4] == ["broken", "a0", "a1", "a2"]
        assert sorted(engine.cache.resident()) == ["a0", "a1", "a2"]
        assert "broken" in caplog.text and "preloading" in caplog.text
        before = engine.cache.stats()["loads"]
        out = engine.submit([5, 6, 7], "a5", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)).result(timeout=120)
        assert out.finish_reason == "length"
        stats = engine.cache.stats()
        assert stats["loads"] == before + 1 and stats["evictions"] == 1 and "a5" in engine.cache.resident()
        assert stats["resident_adapters"] == 3
    finally:
        engine.shutdown(abort=True, timeout=5.0)


def test_preload_adapters_stops_at_the_byte_budget_before_loading_what_does_not_fit(tiny_world, monkeypatch):
    import argparse

    from loramux import MultiLoraModel
    from loramux.cache import estimate_nbytes
    from loramux.server.command import add_arguments, build_engine

    root = tiny_world["root"]
    sizes = [estimate_nbytes(root / f"a{i}", 4) for i in range(3)]
    loads, real = [], MultiLoraModel.load_adapter
    monkeypatch.setattr(MultiLoraModel, "load_adapter", lambda self, path, **kw: loads.append(kw["adapter_name"]) or real(self, path, **kw))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--base", str(tiny_world["base"]), "--adapter-root", str(root), "--preload-adapters",
                              "--max-adapter-bytes", str(sum(sizes) - 1), "--threads", "1"])
    engine, _, _ = build_engine(args)
    try:
        assert sorted(engine.cache.resident()) == ["a0", "a1"] and loads == ["a0", "a1"]  # a2 was not read
    finally:
        engine.shutdown(abort=True, timeout=5.0)
