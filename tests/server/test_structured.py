"""Structured outputs (server/structured.py): the llguidance masks, driven by the tiny seeded model.

Greedy decoding of the tiny model under the mask must give text that ``json.loads`` reads and that
validates against the schema, for several schemas; an unenforceable schema is a 400 before anything
runs. The same through the HTTP server and the real engine is in test_features.py.
"""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from loramux.server import schemas
from loramux.server.errors import APIError
from loramux.server.structured import StructuredOutputs

SCHEMAS = [
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "ok": {"type": "boolean"}},
     "required": ["color", "n", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
     "required": ["name", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
]


def fmt(schema=None) -> schemas.ResponseFormat:
    if schema is None:
        return schemas.ResponseFormat(type="json_object")
    return schemas.ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "t", "schema": schema,
                                                                                         "strict": True}})


@pytest.fixture(scope="module")
def structured(tiny_world):
    tok = tiny_world["tokenizer"]
    return StructuredOutputs(tok, tiny_world["model"].config.vocab_size)


def constrained_greedy(model, tokenizer, constraint, prompt: str, max_new: int = 120) -> tuple[str, str]:
    """Greedy decoding under ``constraint``; (text, finish) with finish 'stop' when it completed."""
    ids = list(tokenizer(prompt)["input_ids"])
    out: list[int] = []
    vocab = model.config.vocab_size
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]  # (V,)
            mask = constraint.allowed(vocab)
            assert mask.shape == (vocab,) and mask.dtype == torch.bool and mask.any()
            token = int(logits.masked_fill(~mask, float("-inf")).argmax())
            constraint.accept(token)
            if token == eos:
                return tokenizer.decode(out), "stop"
            out.append(token)
            if constraint.is_finished():
                return tokenizer.decode(out), "stop"
    return tokenizer.decode(out), "length"


@pytest.mark.parametrize("schema", SCHEMAS + [None], ids=["enum-int-bool", "string-array", "int-array", "json_object"])
@pytest.mark.parametrize("prompt", ["hello world", "select name from users"])
def test_constrained_greedy_output_parses_and_validates(structured, tiny_world, schema, prompt):
    factory = structured.factory(fmt(schema))
    text, finish = constrained_greedy(tiny_world["model"], tiny_world["tokenizer"], factory(), prompt)
    assert finish == "stop", text
    value = json.loads(text)
    jsonschema.validate(value, schema or {"type": "object"})


def test_unconstrained_output_of_the_tiny_model_is_not_json(tiny_world):
    """The control: without the mask the same model writes no JSON, so the test above proves the mask works."""
    model, tok = tiny_world["model"], tiny_world["tokenizer"]
    ids = list(tok("hello world")["input_ids"])
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError):
        json.loads(tok.decode(out[0, len(ids):]))


def test_each_sequence_gets_its_own_state_and_schemas_are_cached(structured):
    factory = structured.factory(fmt(SCHEMAS[2]))
    a, b = factory(), factory()
    first = a.allowed(structured.vocab_size)
    token = int(first.nonzero()[0])
    a.accept(token)
    assert torch.equal(b.allowed(structured.vocab_size), first)  # b has not moved
    assert structured.grammar(fmt(SCHEMAS[2])) is structured.grammar(fmt(SCHEMAS[2]))


def test_a_rejected_token_raises_so_the_engine_fails_only_that_row(structured, tiny_world):
    constraint = structured.factory(fmt(SCHEMAS[0]))()
    mask = constraint.allowed(structured.vocab_size)
    bad = int((~mask).nonzero()[0])
    with pytest.raises(RuntimeError, match="rejected"):
        constraint.accept(bad)


@pytest.mark.parametrize("schema,needle", [
    ({"type": "object", "properties": {"x": {"type": "string", "format": "no-such-format"}}}, "cannot be enforced"),
    ({"type": "frobnicate"}, "cannot be enforced"),
])
def test_unenforceable_schema_is_400(structured, schema, needle):
    with pytest.raises(APIError) as err:
        structured.factory(fmt(schema))
    assert err.value.status == 400 and err.value.param == "response_format" and needle in err.value.message
