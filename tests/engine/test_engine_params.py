"""SamplingParams validation (the contract's fields) and the typed records: no model needed."""
from __future__ import annotations

import math

import pytest

from loramux.engine import Failure, FailureKind, RequestOutput, RequestRejected, SamplingParams, TokenLogprob


@pytest.mark.parametrize("bad, field", [
    (dict(n=0), "n"), (dict(n=17), "n"), (dict(n=True), "n"), (dict(n=2.0), "n"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(logit_bias={5: 101.0}), "logit_bias"), (dict(logit_bias={5: math.nan}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(logit_bias=5), "logit_bias"), (dict(constraint=3), "constraint"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(top_p=math.nan), "top_p"), (dict(top_k=True), "top_k"),
    (dict(seed=2**63), "seed"), (dict(stop_token_ids=[-3]), "stop_token_ids"), (dict(max_tokens=0), "max_tokens"),
])
def test_bad_values_are_refused_naming_the_field(bad, field):
    with pytest.raises(RequestRejected, match=field):
        SamplingParams(**bad)


def test_logit_bias_is_stored_sorted_and_json_keys_accepted():
    params = SamplingParams(logit_bias={"7": 1.5, 3: -100})
    assert params.logit_bias == ((3, -100.0), (7, 1.5))
    assert hash(params) == hash(SamplingParams(logit_bias=[(7, 1.5), (3, -100)]))


def test_tiny_temperatures_are_greedy():
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_records_have_the_contract_fields():
    out = RequestOutput("r", None, [1], "x", failure=Failure(FailureKind.ROW_FAILED, "boom"),
                        logprobs=[TokenLogprob(1, -0.5, ((1, -0.5),))])
    assert out.index == 0 and out.prompt_logprobs is None and out.failure.kind is FailureKind.ROW_FAILED
    assert {k.name for k in FailureKind} == {"ADAPTER_LOAD_FAILED", "UNKNOWN_ADAPTER", "INVALID_REQUEST",
                                             "ROW_FAILED", "MODEL_ERROR", "ABORTED"}
