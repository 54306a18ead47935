"""In-process tests of the HTTP layer (no socket) against a fake engine that follows the engine
contract: request/response shapes, SSE, every error status, auth, runtime-loading path safety,
metrics. The real engine and model are exercised in test_real_engine.py and test_subprocess.py."""
from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient

from loramux.cache import AdapterRegistry
from loramux.server import ServerConfig, create_app
from srv_fake_engine import FakeEngine

KEY = "sk-test"


@pytest.fixture
def world(tiny_world):
    return tiny_world


@pytest.fixture
def engine(world):
    registry = AdapterRegistry()
    registry.add_root(world["root"])
    return FakeEngine(registry, tokenizer=world["tokenizer"])


def make_client(engine, world, **options):
    options.setdefault("base_name", "tiny-base")
    options.setdefault("base_path", str(world["base"]))
    return TestClient(create_app(engine, **options), raise_server_exceptions=False)


@pytest.fixture
def client(engine, world):
    return make_client(engine, world)


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-200:]
    return [json.loads(e) for e in events[:-1]]


def endpoint_input(path: str, text: str) -> dict:
    """The prompt field of ``path``: ``messages`` for chat, ``prompt`` for completions."""
    return {"messages": [{"role": "user", "content": text}]} if path.endswith("chat/completions") else {"prompt": text}


def assert_error(resp, status: int, *needles: str, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert "Traceback" not in resp.text
    for needle in needles:
        assert needle in body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# --------------------------------------------------------------------------------------------- models


def test_models_lists_base_and_every_adapter_with_parent_and_root(client, world):
    data = client.get("/v1/models").json()["data"]
    by_id = {card["id"]: card for card in data}
    assert list(by_id)[0] == "tiny-base" and by_id["tiny-base"]["parent"] is None
    assert by_id["tiny-base"]["root"] == str(world["base"])
    for name, path in world["adapters"].items():
        assert by_id[name]["parent"] == "tiny-base" and by_id[name]["root"] == str(path)
        assert by_id[name]["object"] == "model"
    assert client.get("/v1/models/a3").json()["id"] == "a3"
    assert_error(client.get("/v1/models/nope"), 404, "nope", "a3", code="model_not_found")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_404_listing_available_never_the_base(client, engine, path):
    body = {"model": "no-such-adapter", **endpoint_input(path, "hi")}
    err = assert_error(client.post(path, json=body), 404, "no-such-adapter", "tiny-base", "a0", "a7",
                       code="model_not_found")
    assert err["param"] == "model"
    assert engine.submitted == []  # nothing ran on the base model in its place


# ------------------------------------------------------------------------------------ completions


def test_completion_routes_model_to_adapter_and_base(client, engine, world):
    resp = client.post("/v1/completions", json={"model": "a2", "prompt": "one two", "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == "a2"
    assert body["choices"][0]["text"] == "a2:0 a2:1 a2:2 " and body["choices"][0]["finish_reason"] == "length"
    ids = list(world["tokenizer"]("one two")["input_ids"])  # the server tokenizes (context checks first)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 3, "total_tokens": len(ids) + 3}
    base = client.post("/v1/completions", json={"model": "tiny-base", "prompt": [5, 6, 7], "max_tokens": 1}).json()
    assert base["choices"][0]["text"] == "base:0 "
    (p1, a1, s1), (p2, a2, s2) = engine.submitted
    assert (p1, a1, s1.max_tokens, s1.temperature) == (ids, "a2", 3, 0.0)
    assert (p2, a2, s2.max_tokens, s2.temperature) == ([5, 6, 7], None, 1, 1.0)


def test_sampling_options_reach_the_engine(client, engine):
    client.post("/v1/completions", json={"model": "a1", "prompt": "x", "max_tokens": 2, "temperature": 0.7,
                                         "top_p": 0.9, "top_k": 5, "seed": 42, "stop": "\n\n", "stop_token_ids": [3],
                                         "ignore_eos": True})
    params = engine.submitted[0][2]
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.7, 0.9, 5, 42)
    assert params.stop == ("\n\n",) and params.stop_token_ids == (3,) and params.ignore_eos
    assert engine.submitted[0][1] == "a1"


def test_chat_applies_the_base_chat_template(client, engine, world):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    resp = client.post("/v1/chat/completions", json={"model": "a5", "messages": messages, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "a5:0 a5:1 "}
    expected = world["tokenizer"].apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert engine.submitted[0][0] == list(expected)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_gives_same_text_as_non_stream_and_usage(client, path, include_usage):
    body = {"model": "a4", **endpoint_input(path, "a b c"), "max_tokens": 4}
    plain = client.post(path, json=body).json()
    stream_body = {**body, "stream": True, **({"stream_options": {"include_usage": True}} if include_usage else {})}
    with client.stream("POST", path, json=stream_body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.read().decode())
    chat = path.endswith("chat/completions")
    pieces = [c["delta"].get("content", "") if chat else c["text"] for e in events for c in e["choices"]]
    plain_text = plain["choices"][0]["message"]["content"] if chat else plain["choices"][0]["text"]
    assert "".join(pieces) == plain_text
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length"]
    usages = [e["usage"] for e in events if e.get("usage")]
    # usage only when asked for, then in one final chunk with no choices (and "usage": null before it)
    assert usages == ([plain["usage"]] if include_usage else [])
    if include_usage:
        assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
        assert all("usage" in e and e["usage"] is None for e in events[:-1])
    else:
        assert all("usage" not in e for e in events)
    if chat:
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(e["object"] == "chat.completion.chunk" for e in events)


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,needle", [
    ("max_tokens", -1, "max_tokens (-1) must be >= 1"),
    ("max_tokens", 0, "max_tokens (0)"),
    ("n", 17, "n (17) must be between 1 and 16"),
    ("n", 0, "n (0)"),
    ("temperature", 3.0, "temperature (3.0)"),
    ("top_p", 0.0, "top_p (0.0)"),
    ("top_k", -5, "top_k (-5)"),
    ("stop", [""], "non-empty"),
    ("stop", ["s"] * 9, "at most 8"),
    ("logprobs", 21, "logprobs (21) must be between 0 and 20"),
    ("best_of", 3, "best_of"),
    ("presence_penalty", 0.5, "presence_penalty"),
    ("frequency_penalty", -1.0, "frequency_penalty"),
    ("repetition_penalty", 1.3, "repetition_penalty"),
    ("suffix", "tail", "suffix"),
    ("prompt", [], "empty"),
    ("prompt", [[1, 2], []], "prompt.1 is an empty list"),
    ("prompt", ["a", ""], "prompt.1 is an empty string"),
    ("prompt", "\ud800x", "lone surrogate"),
    ("prompt", ["ok", "\udfffz"], "lone surrogate"),
    ("stop", ["\ud800"], "lone surrogate"),
    ("logit_bias", {"x": 1}, "not a token id"),
    ("logit_bias", {"5": 101}, "between -100 and 100"),
    ("stream_options", {"include_usage": True}, "only allowed with stream: true"),
    ("response_format", {"type": "json_schema"}, "json_schema.schema"),
    ("frobnicate", 1, "unrecognized request argument 'frobnicate'"),
    ("seed", -1, "seed"),
])
def test_bad_values_are_400_naming_the_parameter(client, engine, field, value, needle):
    body = {"model": "a0", "prompt": "x", field: value}
    # json.dumps escapes lone surrogates as \\ud800: valid JSON that decodes to a string UTF-8 cannot hold
    resp = client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    err = assert_error(resp, 400, needle)
    assert err["type"] == "invalid_request_error" and err["param"] == field
    assert engine.submitted == []


def test_bad_chat_values_are_400(client):
    base = {"model": "a0", "messages": [{"role": "user", "content": "x"}]}
    assert_error(client.post("/v1/chat/completions", json={**base, "messages": []}), 400, "messages is empty")
    assert_error(client.post("/v1/chat/completions", json={**base, "max_completion_tokens": -3}), 400,
                 "max_completion_tokens (-3)")
    assert_error(client.post("/v1/chat/completions", json={**base, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "only text parts")
    assert_error(client.post("/v1/chat/completions", json={**base, "tools": [{"type": "function"}]}), 400, "tools")


def test_malformed_json_is_400(client):
    resp = client.post("/v1/completions", content=b'{"model": "a0", "prompt": ', headers={"content-type": "application/json"})
    assert_error(resp, 400, "not valid JSON", code="invalid_json")


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "x"}, "model: Field required"),
    ({"model": "a0"}, "prompt: Field required"),
    ({"model": "a0", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": ["a0"], "prompt": "x"}, "model"),
    ([1, 2, 3], "body"),
])
def test_wrong_json_shape_is_400_naming_the_field(client, body, needle):
    err = assert_error(client.post("/v1/completions", json=body), 400, needle, code="invalid_body")
    assert err["type"] == "invalid_request_error"


def test_wrong_chat_shape_is_400_naming_the_field(client):
    resp = client.post("/v1/chat/completions", json={"model": "a0", "messages": [{"role": "wizard", "content": "x"}]})
    err = assert_error(resp, 400, "messages.0.role")
    assert err["param"] == "messages.0.role"


def test_prompt_or_max_tokens_beyond_the_context_is_400(client, engine, world):
    # the fake's context holds 64 tokens
    resp = client.post("/v1/completions", json={"model": "a0", "prompt": "w " * 500})
    assert_error(resp, 400, "maximum context length is 64 tokens", code="context_length_exceeded")
    n_prompt = len(world["tokenizer"]("hello world")["input_ids"])
    resp = client.post("/v1/completions", json={"model": "a0", "prompt": "hello world", "max_tokens": 64})
    err = assert_error(resp, 400, "maximum context length is 64 tokens", f"{n_prompt} in the prompt",
                       code="context_length_exceeded")
    assert err["param"] == "max_tokens"
    resp = client.post("/v1/chat/completions", json={"model": "a0", "messages": [{"role": "user", "content": "hi"}],
                                                       "max_completion_tokens": 64})
    assert_error(resp, 400, "maximum context length", "in the messages")
    assert engine.submitted == []
    # without max_tokens the default is clamped to what the context leaves
    ok = client.post("/v1/chat/completions", json={"model": "a0", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200 and engine.submitted[0][2].max_tokens == 64 - len(engine.submitted[0][0])


def test_body_too_large_is_413_with_and_without_content_length(engine, world):
    client = make_client(engine, world, max_body_bytes=4096)
    big = {"model": "a0", "prompt": "x" * 10_000}
    assert_error(client.post("/v1/completions", json=big), 413, "exceeds 4096 bytes", code="request_too_large")

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    resp = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(resp, 413, "exceeds")
    assert engine.submitted == []
    assert client.post("/v1/completions", json={"model": "a0", "prompt": "ok"}).status_code == 200


def test_overloaded_engine_is_503_with_retry_after(client, engine):
    engine.overloaded = True
    resp = client.post("/v1/completions", json={"model": "a0", "prompt": "x"})
    assert_error(resp, 503, "overloaded", code="overloaded")
    assert resp.headers["retry-after"] == "1"
    engine.overloaded = False
    assert client.post("/v1/completions", json={"model": "a0", "prompt": "x"}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_adapter_that_fails_to_load_is_an_error_status_not_a_broken_stream(client, engine, stream):
    engine.fail_adapters["a6"] = "AdapterWeightsError: adapter_model.safetensors is truncated"
    resp = client.post("/v1/completions", json={"model": "a6", "prompt": "x", "stream": stream})
    assert_error(resp, 400, "'a6' could not be loaded", "truncated", code="adapter_load_failed")
    assert client.post("/v1/completions", json={"model": "a1", "prompt": "x"}).status_code == 200


def test_unknown_routes_and_methods_answer_in_openai_shape(client):
    assert_error(client.get("/v1/nothing"), 404, "no route")
    assert_error(client.get("/v1/completions"), 405, "")


def test_internal_errors_are_500_without_traceback(client, engine):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    engine.submit = boom
    resp = client.post("/v1/completions", json={"model": "a0", "prompt": "x"})
    err = assert_error(resp, 500, "internal server error", code="internal_error")
    assert "secret" not in resp.text and err["type"] == "server_error"


# ------------------------------------------------------------------------------------------- auth


def test_api_key_required_on_v1_but_not_on_health_or_metrics(engine, world):
    client = make_client(engine, world, api_key=KEY)
    assert_error(client.get("/v1/models"), 401, "missing API key", code="missing_api_key")
    assert_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "incorrect", code="invalid_api_key")
    # no key: 401 before the body is even looked at (no 400/413/422 leak)
    assert client.post("/v1/completions", content=b"{not json").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/metrics").status_code == 200


# ------------------------------------------------------------------------------- runtime loading


def runtime_client(engine, world, **options):
    return make_client(engine, world, allow_runtime_loading=True, adapter_roots=(str(world["runtime"]),), **options)


def test_runtime_loading_is_off_by_default(client, world):
    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(world["good"])})
    assert_error(resp, 403, "--allow-runtime-loading", code="runtime_loading_disabled")
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "a0"}), 403)


def test_config_refuses_runtime_loading_without_a_root():
    with pytest.raises(ValueError, match="adapter root"):
        ServerConfig(allow_runtime_loading=True)


def test_runtime_load_use_and_unload(engine, world):
    client = runtime_client(engine, world)
    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(world["good"])})
    assert resp.status_code == 200, resp.text
    assert "fresh" in resp.text
    card = client.get("/v1/models/fresh").json()
    assert card["root"] == os.path.realpath(world["good"]) and card["parent"] == "tiny-base"
    out = client.post("/v1/completions", json={"model": "fresh", "prompt": "x", "max_tokens": 1}).json()
    assert out["choices"][0]["text"] == "fresh:0 "
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "good"}), 400,
                 "already loaded", code="adapter_exists")
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
    assert_error(client.post("/v1/completions", json={"model": "fresh", "prompt": "x"}), 404, "fresh")
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}), 404, "not loaded")
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "a0"}), 400, "not loaded at runtime")
    # relative paths are taken inside the root
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "rel", "lora_path": "good"}).status_code == 200


@pytest.mark.parametrize("make_path", [
    lambda w: str(w["runtime"] / ".." / "outside" / "evil"),  # .. out of the root
    lambda w: "../outside/evil",  # relative .. out of the root
    lambda w: str(w["outside"]),  # absolute path elsewhere
    lambda w: str(w["runtime"] / "link_out"),  # a symlink inside the root pointing out
    lambda w: "link_out",
    lambda w: "/etc",
])
def test_runtime_load_cannot_escape_the_root(engine, world, make_path):
    client = runtime_client(engine, world)
    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": make_path(world)})
    assert_error(resp, 400, "outside every adapter root", code="path_outside_root")
    assert "evil" not in [c["id"] for c in client.get("/v1/models").json()["data"]]


def test_runtime_load_of_corrupt_missing_or_odd_paths_is_400(engine, world):
    client = runtime_client(engine, world)
    load = lambda name, path: client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    assert_error(load("bad", str(world["corrupt"])), 400, "invalid adapter", code="invalid_adapter")
    assert_error(load("bad", str(world["runtime"] / "missing")), 404, "does not exist", code="adapter_not_found")
    assert_error(load("bad", str(world["runtime"])), 400, "adapter root itself")
    assert_error(load("a/b", "good"), 400, "lora_name")
    assert_error(load("tiny-base", "good"), 400, "base model's name")
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path")
    assert "bad" not in [c["id"] for c in client.get("/v1/models").json()["data"]]
    # still serving
    assert client.post("/v1/completions", json={"model": "a0", "prompt": "x"}).status_code == 200


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_report_requests_tokens_latency_and_engine_state(client, world):
    client.post("/v1/completions", json={"model": "a3", "prompt": "p q", "max_tokens": 3})
    with client.stream("POST", "/v1/completions", json={"model": "a3", "prompt": "p", "max_tokens": 2, "stream": True}) as r:
        r.read()
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    text = client.get("/metrics").text
    assert 'loramux_requests_total{endpoint="completions",finish_reason="length",model="a3"} 2.0' in text
    assert 'loramux_generation_tokens_total{model="a3"} 5.0' in text
    n_prompt = len(world["tokenizer"]("p q")["input_ids"]) + len(world["tokenizer"]("p")["input_ids"])
    assert f'loramux_prompt_tokens_total{{model="a3"}} {float(n_prompt)}' in text
    assert 'loramux_http_errors_total{status="404"} 1.0' in text
    assert "loramux_time_to_first_token_seconds_count 2.0" in text
    assert "loramux_inter_token_latency_seconds_count 1.0" in text
    for series in ("loramux_requests_running", "loramux_requests_waiting", "loramux_adapters_resident",
                   "loramux_adapter_loads_total", "loramux_adapter_evictions_total", "loramux_adapter_load_errors_total"):
        assert f"\n{series} " in text, series


def test_a_runtime_name_unloaded_can_be_loaded_again_and_unloaded(engine, world):
    """The registry remembers which names came through the API: only those can be unloaded, and an
    unloaded name is free at once (running requests keep the old load's weights in the engine)."""
    client = runtime_client(engine, world)
    for _ in range(2):
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "good"}).status_code == 200
        assert engine.registry.is_runtime("fresh")
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        assert "fresh" not in engine.registry and not engine.registry.is_runtime("fresh")


# ------------------------------------------------------------------ n, batch prompts, logprobs, echo (shapes)


def test_batch_prompts_and_n_number_the_choices(client, engine):
    body = {"model": "a1", "prompt": ["one", "two"], "n": 2, "max_tokens": 2}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "a1:0 a1:1 " for c in out["choices"])
    assert [s.n for _, _, s in engine.submitted] == [2, 2]  # one engine request per prompt, n sequences each
    assert out["usage"]["completion_tokens"] == 8
    with client.stream("POST", "/v1/chat/completions", json={"model": "a1", "messages": [{"role": "user", "content": "x"}],
                                                              "n": 3, "max_tokens": 2, "stream": True}) as resp:
        events = sse_events(resp.read().decode())
    roles = [c["index"] for e in events for c in e["choices"] if c["delta"].get("role")]
    texts: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["delta"].get("content", "")
    assert sorted(roles) == [0, 1, 2] and texts == {i: "a1:0 a1:1 " for i in range(3)}


def test_completion_logprobs_shape(client, world):
    out = client.post("/v1/completions", json={"model": "a2", "prompt": [5, 6, 7], "max_tokens": 3, "logprobs": 2}).json()
    lp = out["choices"][0]["logprobs"]
    tok = world["tokenizer"]
    assert lp["tokens"] == [tok.decode([i]) for i in range(3)]
    assert lp["token_logprobs"] == pytest.approx([-0.1, -0.2, -0.3])
    assert [v for t in lp["top_logprobs"] for v in t.values()] == pytest.approx([-0.2, -0.3, -0.3, -0.4, -0.4, -0.5])
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    echo = client.post("/v1/completions", json={"model": "a2", "prompt": [5, 6, 7], "max_tokens": 3, "logprobs": 1,
                                                "echo": True}).json()["choices"][0]
    assert echo["text"] == tok.decode([5, 6, 7]) + "a2:0 a2:1 a2:2 "
    assert echo["logprobs"]["token_logprobs"][:3] == [None, pytest.approx(-0.7), pytest.approx(-0.8)]
    assert echo["logprobs"]["top_logprobs"][0] is None and len(echo["logprobs"]["tokens"]) == 6


def test_chat_logprobs_shape(client, world):
    body = {"model": "a2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True,
            "top_logprobs": 2}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None and len(content) == 2
    tok = world["tokenizer"]
    assert content[0] == {"token": tok.decode([0]), "logprob": pytest.approx(-0.1), "bytes": list(tok.decode([0]).encode()),
                          "top_logprobs": [{"token": tok.decode([1]), "logprob": pytest.approx(-0.2),
                                            "bytes": list(tok.decode([1]).encode())},
                                           {"token": tok.decode([2]), "logprob": pytest.approx(-0.3),
                                            "bytes": list(tok.decode([2]).encode())}]}
    assert_error(client.post("/v1/chat/completions", json={**body, "logprobs": False}), 400, "needs logprobs: true")


def test_options_reach_the_engine_as_sampling_params(client, engine):
    client.post("/v1/completions", json={"model": "a1", "prompt": "x", "max_tokens": 2, "logit_bias": {"5": -100, "7": 2.5},
                                         "temperature": 1e-7, "response_format": {"type": "json_object"}})
    params = engine.submitted[0][2]
    assert dict(params.logit_bias) == {5: -100.0, 7: 2.5} and params.greedy and callable(params.constraint)
    assert params.constraint() is not params.constraint()  # one state per sequence


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").json()
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
                         ("/v1/models/{model_id}", "get"), ("/health", "get")]:
        assert "$ref" in json.dumps(spec["paths"][path][method]["responses"]["200"]), path
    assert client.get("/docs").status_code == 200
