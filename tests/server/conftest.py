"""Fixtures of the server tests: a tiny base model directory with PEFT adapters (built once per
session), a fake engine for error paths, and the app around either."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

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
    return {"top": top, "base": top / "base", "root": top / "root", "runtime": runtime, "adapters": adapters,
            "outside": outside, "good": good, "corrupt": corrupt, "model": model, "tokenizer": tokenizer}
