"""Adapter registry and resident-adapter cache: discovery, LRU, pinning, budgets, failures, host tier.

A fake model stands in for MultiLoraModel here (loads are bookkeeping only, kept in the model's own
``LoadTable``: the same pins and retirement), so these tests are about the cache; tests/engine/ runs
the same cache on real models.
"""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from loramux.cache import AdapterCache, AdapterRegistry, estimate_nbytes
from loramux.errors import AdapterError, AdapterNotFoundError, AdapterWeightsError, UnknownAdapterError
from loramux.loads import AdapterInfo, LoadTable


def fake_adapter(path, numel: int = 250):
    """A valid rank-1 adapter directory of ``numel`` fp16 numbers (1000 bytes once loaded as fp32)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["x"]}))
    half = numel // 2
    save_file({"base_model.model.x.lora_A.weight": torch.ones(1, half, dtype=torch.float16),
               "base_model.model.x.lora_B.weight": torch.ones(numel - half, 1, dtype=torch.float16)},
              str(path / "adapter_model.safetensors"))
    return path


GUARD_S = 600.0  # an overall guard against a hang, never a race: waits end on their condition
_MODELS: list["FakeModel"] = []


@pytest.fixture(autouse=True)
def _open_every_gate():
    """A test that fails while a load is held must not leave the loader thread blocked."""
    yield
    for model in _MODELS:
        for gate in model.gates.values():
            gate.set()
    _MODELS.clear()


class FakeModel:
    """load_adapter/delete_adapter/adapters/pin/unpin like MultiLoraModel, over the model's own
    ``LoadTable`` (no tensors); ``gates`` hold a load, ``fail`` breaks one."""

    dtype = torch.float32

    def __init__(self, device: str = "cpu", parsed: bool = False) -> None:
        self.device = torch.device("cpu") if device == "cpu" else SimpleNamespace(type=device)
        self.accepts_parsed_adapters = parsed
        self.table = LoadTable()
        self.lock = threading.Lock()
        self.gates: dict[str, threading.Event] = {}
        self.fail: set[str] = set()
        self.sources: list[tuple[str, object]] = []
        _MODELS.append(self)

    @property
    def loaded(self) -> dict[str, AdapterInfo]:
        """Names served now (a retired load still pinned is not among them)."""
        with self.lock:
            return dict(self.table.current)

    adapters = loaded

    def preload(self, name: str, path: str | None, nbytes: int = 10) -> AdapterInfo:
        """An adapter the user loaded before the cache existed."""
        with self.lock:
            info = AdapterInfo(name=name, path=path, slot=self.table.reserve(), ranks={}, scalings={},
                               modules_to_save=(), use_dora=False, nbytes=nbytes)
            old = self.table.publish(info)
            if old is not None and self.table.retire(old):
                self.table.free(old.slot)
            return info

    def load_adapter(self, source, adapter_name, replace=False):
        if adapter_name in self.gates:
            self.gates[adapter_name].wait()  # until the test opens it (or its teardown does)
        if adapter_name in self.fail:
            raise AdapterWeightsError(f"{adapter_name}: boom")
        self.sources.append((adapter_name, source))
        return self.preload(adapter_name, str(source), nbytes=1000)

    def delete_adapter(self, name):
        with self.lock:
            info = self.table.get(name)
            if self.table.retire(info):
                self.table.free(info.slot)

    def pin(self, adapter):
        with self.lock:
            info = self.table.get(adapter) if isinstance(adapter, str) else adapter
            assert self.table.holds(info)
            self.table.pin(info.slot)
            return info

    def unpin(self, info):
        with self.lock:
            if self.table.unpin(info.slot):
                self.table.free(info.slot)

    def pins(self, info):
        with self.lock:
            return self.table.pins(info)

    def retired_loads(self):
        with self.lock:
            return self.table.retired()


@pytest.fixture
def adapters(tmp_path):
    return {name: fake_adapter(tmp_path / name) for name in "abcde"}


@pytest.fixture
def registry(adapters):
    reg = AdapterRegistry()
    for name, path in adapters.items():
        reg.register(name, path)
    return reg


def wait_resident(cache: AdapterCache, name: str) -> None:
    """Until the background load of ``name`` ended (bounded by that condition; the guard only stops a hang)."""
    deadline = time.monotonic() + GUARD_S
    while not cache.is_resident(name):
        assert time.monotonic() < deadline, f"{name} never loaded"
        if not cache.is_loading(name) and not cache.is_resident(name):
            raise AssertionError(f"the load of {name} failed: {cache.take_failures()}")
        time.sleep(0.002)


def load(cache: AdapterCache, name: str, **kw) -> None:
    assert cache.start_load(name, **kw) == "loading"
    wait_resident(cache, name)


# ---------------------------------------------------------------- registry
def test_registry_by_name_and_by_root(tmp_path):
    root = tmp_path / "root"
    fake_adapter(root / "x")
    fake_adapter(root / "y")
    (root / "not-an-adapter").mkdir()
    reg = AdapterRegistry()
    reg.register("solo", fake_adapter(tmp_path / "elsewhere"))
    assert reg.add_root(root) == 2
    assert reg.names() == ["solo", "x", "y"] and len(reg) == 3
    assert reg.path_of("x") == root / "x" and "solo" in reg and "not-an-adapter" not in reg
    fake_adapter(root / "z")  # appears later: found without re-scanning
    assert reg.path_of("z") == root / "z"
    with pytest.raises(UnknownAdapterError, match="not known"):
        reg.path_of("nope")
    for bad in ["../x", "a/b", ".hidden", ""]:
        with pytest.raises(UnknownAdapterError, match="not a valid adapter name"):
            reg.path_of(bad)
    with pytest.raises(AdapterNotFoundError):
        reg.register("empty", tmp_path / "root" / "not-an-adapter")
    reg.unregister("solo")
    assert "solo" not in reg


def test_estimate_matches_what_the_model_reports(tmp_path):
    """The byte budget is checked before loading from the file header; it must match the loaded size."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "engine"))
    from engine_helpers import save_adapter, tiny_llama

    from loramux import MultiLoraModel

    base = tiny_llama()
    path = save_adapter(base, tmp_path / "a", seed=1, targets=["q_proj", "down_proj"])
    info = MultiLoraModel(base).load_adapter(path, adapter_name="a")
    assert estimate_nbytes(tmp_path / "a", 4) == info.nbytes


# ---------------------------------------------------------------- cache policy
def test_pinned_adapter_is_never_evicted(registry):
    model = FakeModel()
    cache = AdapterCache(model, registry, max_loaded=1)
    load(cache, "a")
    held = cache.acquire("a")
    assert held is model.loaded["a"] and cache.pins("a") == 1
    assert cache.start_load("b", force=True) == "full"  # the only resident adapter is pinned
    assert "a" in model.loaded and cache.stats()["evictions"] == 0
    cache.release(held)
    load(cache, "b")
    assert list(model.loaded) == ["b"] and cache.stats()["evictions"] == 1


def test_lru_over_unpinned_and_protection(registry):
    model = FakeModel()
    cache = AdapterCache(model, registry, max_loaded=3)
    for name in "abc":
        load(cache, name)
    cache.release(cache.acquire("a"))  # a is now the most recently used; b the least
    load(cache, "d")
    assert sorted(model.loaded) == ["a", "c", "d"]
    # c is least recently used now, but a waiting request wants it: evict a instead
    load(cache, "e", protected=frozenset({"c"}))
    assert sorted(model.loaded) == ["c", "d", "e"]
    # everything protected: only the head of the queue (force) may evict a protected one
    assert cache.start_load("a", protected=frozenset("cde")) == "full"
    load(cache, "a", protected=frozenset("cde"), force=True)
    assert cache.stats()["resident_adapters"] == 3


def test_byte_budget(registry):
    model = FakeModel()  # each fake adapter: 250 fp16 numbers -> 1000 bytes as fp32
    cache = AdapterCache(model, registry, max_loaded=None, max_bytes=2500)
    load(cache, "a")
    load(cache, "b")
    load(cache, "c")  # 3000 > 2500: a leaves
    assert sorted(model.loaded) == ["b", "c"] and cache.stats()["resident_bytes"] == 2000
    small = AdapterCache(FakeModel(), registry, max_bytes=999)
    with pytest.raises(AdapterError, match="max_adapter_bytes"):
        small.start_load("a")


def test_loads_run_in_the_background_and_failures_are_reported(registry):
    model = FakeModel()
    model.gates["a"], model.gates["b"] = threading.Event(), threading.Event()
    model.fail.add("b")
    woke = threading.Event()
    cache = AdapterCache(model, registry, max_concurrent_loads=2, on_change=woke.set)
    # both gates are closed: had start_load waited for its load, it would not have returned at all
    assert cache.start_load("a") == "loading" and cache.start_load("b") == "loading"
    assert cache.start_load("c") == "busy"  # two loads in flight already
    model.gates["b"].set()
    assert woke.wait(GUARD_S)  # on_change runs after the failure is recorded
    failures = cache.take_failures()
    assert list(failures) == ["b"] and "boom" in str(failures["b"])
    assert cache.is_loading("a") and not cache.is_resident("a")
    model.gates["a"].set()
    wait_resident(cache, "a")
    stats = cache.stats()
    assert stats["loads"] == 1 and stats["load_errors"] == 1 and stats["load_seconds"] > 0


def test_adopts_adapters_loaded_before(registry, adapters):
    model = FakeModel()
    model.preload("a", str(adapters["a"]))
    model.preload("own", None)  # no directory: can never be reloaded
    cache = AdapterCache(model, registry, max_loaded=2)
    assert cache.is_resident("a") and cache.is_resident("own")
    load(cache, "b")  # evicts a (reloadable), never "own"
    assert sorted(model.loaded) == ["b", "own"]
    cache.evict_unpinned()
    assert list(model.loaded) == ["own"]


def test_host_tier_on_cuda_skips_the_disk_on_reload(registry):
    model = FakeModel(device="cuda", parsed=True)
    cache = AdapterCache(model, registry, max_loaded=1)
    load(cache, "a")
    load(cache, "b")
    load(cache, "a")  # back from host memory
    kinds = [(name, type(src).__name__) for name, src in model.sources]
    assert kinds == [("a", "AdapterFile"), ("b", "AdapterFile"), ("a", "AdapterFile")]
    assert model.sources[0][1] is model.sources[2][1]
    assert cache.stats()["host_hits"] == 1 and cache.stats()["host_tier_adapters"] == 2


def test_unregistered_or_repointed_adapter_is_not_served_and_leaves_once_unused(registry, adapters, tmp_path):
    model = FakeModel()
    cache = AdapterCache(model, registry, max_loaded=2)
    load(cache, "a")
    load(cache, "b")
    held = cache.acquire("a")
    registry.unregister("a")  # a running request still uses it: its weights stay, but it is no longer served
    assert not cache.is_resident("a") and cache.acquire("a") is None and "a" not in model.loaded
    assert model.retired_loads() == [held] and model.pins(held) == 1
    stats = cache.stats()  # the retired load still takes its place and bytes
    assert stats["resident_adapters"] == 2 and stats["resident_bytes"] == 2000 and stats["pinned"] == 1
    load(cache, "c")  # in b's place (unpinned); a's old weights keep the other one
    held_c = cache.acquire("c")
    assert list(model.loaded) == ["c"] and cache.start_load("d") == "full"
    cache.release(held)  # its request ended: the old weights leave, and their place is free
    assert model.retired_loads() == [] and model.pins(held) == 0
    load(cache, "b")
    registry.register("c", fake_adapter(tmp_path / "c2"))  # re-pointed while in use: the next load is the new one
    assert "c" not in model.loaded and model.retired_loads() == [held_c]
    cache.evict_unpinned()
    load(cache, "c")  # at once, beside the old weights its running request still uses
    assert model.sources[-1] == ("c", str(tmp_path / "c2")) and model.loaded["c"] is not held_c
    cache.release(held_c)
    assert model.retired_loads() == [] and list(model.loaded) == ["c"]
    assert cache.stats()["evictions"] == 4  # b, a (unregistered), c (re-pointed), b


def test_an_adapter_repointed_while_loading_is_dropped_when_its_load_ends(registry, tmp_path):
    model = FakeModel()
    model.gates["a"] = threading.Event()
    woke = threading.Event()
    cache = AdapterCache(model, registry, on_change=woke.set)
    assert cache.start_load("a") == "loading"
    registry.register("a", fake_adapter(tmp_path / "a2"))  # its files change while the old ones are read
    model.gates["a"].set()
    assert woke.wait(GUARD_S)
    assert "a" not in model.loaded and not cache.is_resident("a") and model.retired_loads() == []
    del model.gates["a"]
    load(cache, "a")
    assert model.sources[-1] == ("a", str(tmp_path / "a2"))


def test_force_never_evicts_an_adapter_a_request_ahead_waits_for(registry):
    """The head of the load queue may displace adapters only requests behind it want, not those of
    requests ahead of it: they are admitted first, and evicting theirs meant loading it again."""
    model = FakeModel()
    cache = AdapterCache(model, registry, max_loaded=2)
    load(cache, "a")
    load(cache, "b")
    assert cache.start_load("c", protected=frozenset("ab"), force=True, keep=frozenset("ab")) == "full"
    assert sorted(model.loaded) == ["a", "b"] and cache.stats()["evictions"] == 0
    load(cache, "c", protected=frozenset("ab"), force=True, keep=frozenset("a"))
    assert sorted(model.loaded) == ["a", "c"]
