"""Engine test fixtures: tiny seeded models and PEFT adapters (non-zero B), built once per session."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import save_adapter, tiny_gpt2, tiny_llama


@pytest.fixture(scope="session")
def llama_adapters(tmp_path_factory):
    """{name: path} for four adapters (a-d) on the tiny Llama."""
    root = tmp_path_factory.mktemp("llama_adapters")
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    paths = {name: save_adapter(base, root / name, seed=10 + i, targets=targets) for i, name in enumerate("abcd")}
    return paths


@pytest.fixture(scope="session")
def gpt2_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_adapters")
    base = tiny_gpt2()
    return {name: save_adapter(base, root / name, seed=20 + i, targets=["c_attn", "c_fc"], fan_in_fan_out=True) for i, name in enumerate("ab")}


@pytest.fixture
def llama_model():
    from loramux import MultiLoraModel

    return MultiLoraModel(tiny_llama())


@pytest.fixture
def registry(llama_adapters):
    from loramux.engine import AdapterRegistry

    reg = AdapterRegistry()
    for name, path in llama_adapters.items():
        reg.register(name, path)
    return reg




@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs on a busy machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
