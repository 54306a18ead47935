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
