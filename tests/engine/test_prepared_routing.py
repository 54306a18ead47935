"""MultiLoraModel.prepare_routing: what the decode batch hands the model instead of names."""
from __future__ import annotations

import pytest
import torch

from loramux.errors import UnknownAdapterError


def test_a_prepared_routing_equals_names_and_never_goes_stale(llama_model, registry):
    model = llama_model
    model.load_adapter(registry.path_of("a"), adapter_name="a")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    prepared = model.prepare_routing(["a", None])
    with torch.no_grad():
        by_name = model(input_ids=ids, adapter_names=["a", "__base__"]).logits
        assert torch.equal(model(input_ids=ids, adapter_names=prepared).logits, by_name)
        model.load_adapter(registry.path_of("b"), adapter_name="a", replace=True)  # same name, new weights
        after = model(input_ids=ids, adapter_names=prepared).logits
        assert torch.equal(after, model(input_ids=ids, adapter_names=["a", None]).logits)
        assert not torch.allclose(after[0], by_name[0]) and torch.allclose(after[1], by_name[1])
    model.delete_adapter("a")
    with pytest.raises(UnknownAdapterError):
        model(input_ids=ids, adapter_names=prepared)
    with pytest.raises(Exception, match="rows"):
        model(input_ids=ids[:1], adapter_names=prepared)


@pytest.mark.parametrize("held", [False, True], ids=["names", "pinned loads"])
def test_a_routing_prepared_under_a_merge_is_not_reused_under_another_adapters_merge(llama_model, registry, held):
    # prepared while "a" is merged into W0, its rows add no LoRA: after unmerging "a" and merging "b" the same
    # mapping would serve b's weights to rows that asked for "a". It must be refused as the names would be.
    from loramux.errors import MergedAdapterError

    model = llama_model
    model.load_adapter(registry.path_of("a"), adapter_name="a")
    model.load_adapter(registry.path_of("b"), adapter_name="b")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        want_a = model(input_ids=ids, adapter_names=["a", "a"]).logits
        model.merge_adapter("a")
        rows = [model.pin("a"), model.pin("a")] if held else ["a", "a"]
        prepared = model.prepare_routing(rows)
        assert torch.allclose(model(input_ids=ids, adapter_names=prepared).logits, want_a, atol=1e-5)
        model.unmerge_adapter()
        model.merge_adapter("b")
        with pytest.raises(MergedAdapterError, match="'b' is merged"):
            model(input_ids=ids, adapter_names=["a", "a"])
        with pytest.raises(MergedAdapterError, match="'b' is merged"):
            model(input_ids=ids, adapter_names=prepared)
        model.unmerge_adapter()
        model.merge_adapter("a")  # the same merge again: the prepared rows are right again
        assert torch.allclose(model(input_ids=ids, adapter_names=prepared).logits, want_a, atol=1e-5)
        model.unmerge_adapter()
        assert torch.allclose(model(input_ids=ids, adapter_names=prepared).logits, want_a, atol=1e-5)
