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


def _engine(world):
    from loramux import MultiLoraModel
    from loramux.base import load_base
    from loramux.engine import Engine

    model, tok = load_base(str(world["base"]))
    return Engine(MultiLoraModel(model), tok, max_running=8)


def _run(engine, jobs):
    handles = [engine.submit(prompt, None, params) for prompt, params in jobs]
    for _ in range(10_000):  # a guard: each step advances every row by one token
        if all(h.finished for h in handles):
            break
        engine.step()
    return [h.result() for h in handles]


def test_engine_batch_of_constrained_and_free_rows_equals_each_row_alone(structured, tiny_world):
    """Greedy and seeded-sampled rows of different schemas beside free rows, in one decode batch: every
    row's tokens equal the same request run alone, the greedy constrained ones equal the plain masked
    loop above (the oracle), and every constrained answer parses and validates."""
    from loramux.engine import SamplingParams

    greedy = dict(max_tokens=60, temperature=0)
    sampled = dict(max_tokens=60, temperature=0.9, top_p=0.9)
    jobs = [("hello world", SamplingParams(constraint=structured.factory(fmt(SCHEMAS[0])), **greedy)),
            ("hello world", SamplingParams(**greedy)),
            ("select name from users", SamplingParams(constraint=structured.factory(fmt(SCHEMAS[2])), **greedy)),
            ("hello world", SamplingParams(seed=5, constraint=structured.factory(fmt(SCHEMAS[1])), **sampled)),
            ("select name from users", SamplingParams(seed=6, **sampled)),
            ("select name from users", SamplingParams(seed=7, constraint=structured.factory(fmt(SCHEMAS[0])), **sampled))]
    schema_of = {0: SCHEMAS[0], 2: SCHEMAS[2], 3: SCHEMAS[1], 5: SCHEMAS[0]}
    engine = _engine(tiny_world)
    together = _run(engine, jobs)
    for i, job in enumerate(jobs):
        alone = _run(engine, [job])[0]
        assert together[i].token_ids == alone.token_ids, i
        if i in schema_of:
            assert together[i].finish_reason == "stop", (i, together[i].text)
            jsonschema.validate(json.loads(together[i].text), schema_of[i])
    for i in (0, 2):
        text, _ = constrained_greedy(tiny_world["model"], tiny_world["tokenizer"], jobs[i][1].constraint(), jobs[i][0])
        assert together[i].text == text, i
