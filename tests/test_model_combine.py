"""add_weighted_adapter with every PEFT recipe (TIES, DARE, magnitude pruning, their SVD forms): logits equal
PEFT's combined adapter, DARE's random masks included (same torch seed), and bad arguments refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_fixtures import VOCAB, make_adapter, peft_oracle, tiny_gpt2, tiny_llama
from loramux import AdapterConfigError, MultiLoraModel

PRUNING = ["ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
           "magnitude_prune_svd"]
SEED = 1234


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_llama(seed=11)
    root = tmp_path_factory.mktemp("combine")
    paths = {
        "plain": make_adapter(base, root / "plain", seed=20, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "other": make_adapter(base, root / "other", seed=21, r=4, lora_alpha=16, target_modules=["o_proj", "v_proj", "up_proj"]),
        "wide": make_adapter(base, root / "wide", seed=22, r=8, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
    }
    return base, paths


def _ids(n=3):
    torch.manual_seed(4)
    return torch.randint(3, VOCAB, (n, 8))


def _ours(base, paths):
    m = MultiLoraModel(copy.deepcopy(base))
    for n, p in paths.items():
        m.load_adapter(p, adapter_name=n)
    return m


def _compare(base, paths, names, weights, **kwargs):
    """PEFT's and loramux's combined adapter, each made right after torch.manual_seed(SEED); max |logit diff|."""
    oracle = peft_oracle(base, {n: paths[n] for n in names})
    ours = _ours(base, {n: paths[n] for n in names})
    torch.manual_seed(SEED)
    oracle.add_weighted_adapter(names, weights, "mix", **kwargs)
    torch.manual_seed(SEED)
    ours.add_weighted_adapter(names, weights, "mix", **kwargs)
    oracle.set_adapter("mix")
    ids = _ids()
    with torch.no_grad():
        expected = oracle(input_ids=ids).logits
        got = ours(input_ids=ids, adapter_names="mix").logits
        base_logits = ours(input_ids=ids, adapter_names="__base__").logits
    assert (expected - base_logits).abs().max() > 1e-3, "the combined adapter must change the output"
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("combination_type", PRUNING)
def test_pruning_combinations_match_peft(setup, combination_type):
    base, paths = setup
    diff = _compare(base, paths, ["plain", "other"], [0.7, -0.4], combination_type=combination_type, density=0.5)
    assert diff < 1e-4, f"{combination_type}: max |logit diff| {diff:.3g} vs PEFT"


@pytest.mark.parametrize("combination_type", ["ties", "dare_ties_svd"])
def test_majority_sign_frequency_matches_peft(setup, combination_type):
    base, paths = setup
    diff = _compare(base, paths, ["plain", "other"], [1.0, 0.6], combination_type=combination_type, density=0.3,
                    majority_sign_method="frequency")
    assert diff < 1e-4


@pytest.mark.parametrize("combination_type", ["ties_svd", "dare_linear_svd", "magnitude_prune_svd"])
def test_svd_forms_with_different_ranks_and_svd_rank(setup, combination_type):
    base, paths = setup
    for svd_rank in (None, 3):
        diff = _compare(base, paths, ["plain", "wide"], [0.5, 0.8], combination_type=combination_type, density=0.6,
                        svd_rank=svd_rank)
        assert diff < 1e-4, f"svd_rank={svd_rank}: {diff:.3g}"


def test_svd_clamp_matches_peft(setup):
    base, paths = setup
    assert _compare(base, paths, ["plain", "other"], [0.7, 0.3], combination_type="svd", svd_clamp=0.95) < 1e-4


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_dare_follows_peft_rng_whatever_init_lora_weights(setup, tmp_path, init):
    """PEFT's new adapter layers draw from the global generator according to the first adapter's
    init_lora_weights before DARE's masks are drawn; loramux replays the same draws."""
    base, paths = setup
    edited = {n: tmp_path / n for n in ("plain", "other")}
    for n, p in edited.items():
        p.mkdir()
        for f in paths[n].iterdir():
            (p / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((edited["plain"] / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (edited["plain"] / "adapter_config.json").write_text(json.dumps(cfg))
    for combination_type in ("dare_ties", "dare_linear_svd"):
        diff = _compare(base, edited, ["plain", "other"], [0.9, 0.5], combination_type=combination_type, density=0.4)
        assert diff < 1e-4, f"{combination_type}: {diff:.3g}"


def test_gpt2_conv1d_dare_svd_matches_peft(tmp_path):
    """Conv1D stores W as (d_in, d_out): PEFT draws DARE's masks in that layout, so must loramux."""
    base = tiny_gpt2(seed=3)
    paths = {n: make_adapter(base, tmp_path / n, seed=30 + i, r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
             for i, n in enumerate(["a", "b"])}
    for combination_type in ("dare_linear_svd", "dare_ties"):
        assert _compare(base, paths, ["a", "b"], [0.6, 0.6], combination_type=combination_type, density=0.5) < 1e-4


def test_dare_masks_are_random_and_generator_is_deterministic(setup):
    base, paths = setup
    m = _ours(base, {n: paths[n] for n in ("plain", "other")})
    ids = _ids()
    outs = []
    for name, gen_seed in [("g1", 7), ("g2", 7), ("g3", 8)]:
        m.add_weighted_adapter(["plain", "other"], [0.7, 0.3], name, combination_type="dare_linear", density=0.5,
                               generator=torch.Generator().manual_seed(gen_seed))
        with torch.no_grad():
            outs.append(m(input_ids=ids, adapter_names=name).logits)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2], atol=1e-4)
    assert m.adapters["g1"].config.r == 4 and m.adapters["g1"].config.lora_alpha == 4


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(combination_type="ties"), "needs density in (0, 1]"),
    (dict(combination_type="dare_linear", density=0.0), "needs density in (0, 1]"),
    (dict(combination_type="dare_ties", density=1.5), "needs density in (0, 1]"),
    (dict(combination_type="ties", density=float("nan")), "needs density"),
    (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method 'mean'"),
    (dict(combination_type="blend"), "combination_type 'blend' is not one of"),
    (dict(combination_type="svd", svd_rank=0), "svd_rank"),
])
def test_bad_arguments_are_refused_and_model_unchanged(setup, kwargs, fragment):
    base, paths = setup
    m = _ours(base, {n: paths[n] for n in ("plain", "other")})
    before = dict(m.adapters)
    with pytest.raises(AdapterConfigError) as info:
        m.add_weighted_adapter(["plain", "other"], [0.5, 0.5], "mix", **kwargs)
    assert fragment in str(info.value)
    assert dict(m.adapters) == before


def test_one_rank_types_refuse_different_ranks_and_nonfinite_weights(setup):
    base, paths = setup
    m = _ours(base, {n: paths[n] for n in ("plain", "wide")})
    with pytest.raises(AdapterConfigError, match="needs adapters of one rank, got \\[4, 8\\]"):
        m.add_weighted_adapter(["plain", "wide"], [0.5, 0.5], "mix", combination_type="dare_ties", density=0.5)
    with pytest.raises(AdapterConfigError, match="weights\\[1\\] = inf"):
        m.add_weighted_adapter(["plain", "wide"], [0.5, float("inf")], "mix", combination_type="cat")
    assert sorted(m.adapters) == ["plain", "wide"]
