"""Issue 12 through the official ``openai`` client against ``loramux serve`` in a subprocess (tiny
seeded model, PEFT adapters, the real engine). Every answer is compared with a solo run: the
MultiLoraModel oracle (greedy text, raw-logit logprobs) or the same server with n = 1 and seed + i.
"""
from __future__ import annotations

import http.client
import json
import signal
import threading

import httpx
import jsonschema
import openai
import pytest

from srv_process import ServerProcess

KEY = "sk-features"
PROMPTS = ["hello world", "select name from users", "the quick brown fox"]


@pytest.fixture(scope="module")
def server(tiny_world, tmp_path_factory):
    args = ["--base", str(tiny_world["base"]), "--served-model-name", "tiny-base",
            "--adapter-root", str(tiny_world["root"]), "--adapter-root", str(tiny_world["runtime"]),
            "--adapter-root", str(tiny_world["broken"]), "--allow-runtime-loading", "--api-key", KEY,
            "--threads", "1", "--max-running", "16"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("features") / "serve.log")
    yield proc
    rc = proc.stop(signal.SIGTERM)
    assert rc == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


# ------------------------------------------------------------------------------ never a 500


def test_lone_surrogate_prompt_is_400_and_the_connection_stays_open(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [{"model": "a0", "prompt": "\ud800x", "max_tokens": 2},
              {"model": "a0", "prompt": ["ok", "\udfffx"], "max_tokens": 2},
              {"model": "a0", "messages": [{"role": "user", "content": "\ud800"}]}]
    for body in bodies:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        conn.request("POST", path, body=json.dumps(body), headers=headers)  # json.dumps escapes it: valid JSON
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        assert resp.status == 400 and "surrogate" in err["message"] and err["type"] == "invalid_request_error", err
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "a0", "prompt": [5, 6, 7], "max_tokens": 2}),
                 headers=headers)  # the same keep-alive connection answers the next request
    assert conn.getresponse().status == 200
    conn.close()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("name,needle", [("bad_json", "adapter_config.json"), ("bad_regex", "target_modules"),
                                         ("nan_alpha", "lora_alpha")])
def test_adapter_failing_on_first_use_is_400_adapter_load_failed_with_one_log_line(server, client, name, needle):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            out = client.completions.create(model=name, prompt="x", max_tokens=2, stream=stream)
            list(out)
        body = err.value.body
        assert body["code"] == "adapter_load_failed" and needle in body["message"], body
    log = server.log()
    assert "Traceback" not in log
    assert sum(1 for line in log.splitlines() if name in line) == 2  # one line per failed request


def test_validation_errors_are_400_with_param(server):
    with raw(server) as c:
        for path, body, param in [("/v1/completions", {"model": "a0"}, "prompt"),
                                  ("/v1/completions", {"model": "a0", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
                                  ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "wizard"}]},
                                   "messages.0.role")]:
            resp = c.post(path, json=body)
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["param"] == param and resp.json()["error"]["type"] == "invalid_request_error"


def test_options_loramux_cannot_honour_are_400_naming_them(client):
    for kwargs, name in [({"presence_penalty": 0.5}, "presence_penalty"), ({"extra_body": {"min_p": 0.2}}, "min_p"),
                         ({"extra_body": {"guided_regex": "a+"}}, "guided_regex"), ({"suffix": "x"}, "suffix")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="a0", prompt="x", max_tokens=2, **kwargs)
        assert err.value.body["param"] == name, err.value.body


def test_max_tokens_beyond_the_context_is_400(client, oracle):
    n = len(oracle.prompt_ids("hello world"))
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens") as err:
        client.completions.create(model="a0", prompt="hello world", max_tokens=512 - n + 1)
    assert f"{n} in the prompt" in str(err.value)
    out = client.completions.create(model="a0", prompt="hello world", max_tokens=512 - n, temperature=0)
    assert out.choices[0].text == oracle.completion("hello world", "a0", 512 - n)


def test_openapi_and_docs_are_served_with_response_models(server):
    with raw(server) as c:
        spec = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get")]:
        ok = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in ok, (path, ok)
        assert "400" in spec["paths"][path][method]["responses"]


# ------------------------------------------------------------------------------ stream usage


def test_stream_usage_only_with_include_usage(client, server):
    plain = client.completions.create(model="a1", prompt="hello world", max_tokens=5, temperature=0)
    chunks = list(client.completions.create(model="a1", prompt="hello world", max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None for c in chunks)
    for include in (None, False):
        chunks = list(client.completions.create(model="a1", prompt="hello world", max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": include}))
        assert all(c.usage is None for c in chunks)
    chunks = list(client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.completions.create(model="a1", prompt="x", max_tokens=2, stream_options={"include_usage": True})
    assert plain.usage.completion_tokens == 5 or plain.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------ batch prompts, n


def test_batch_prompts_one_choice_each_equal_solo(client, oracle):
    ids = oracle.prompt_ids("the quick brown fox")
    out = client.completions.create(model="a2", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [oracle.completion(p, "a2", 8) for p in PROMPTS[:2]]
    assert out.usage.prompt_tokens == sum(len(oracle.prompt_ids(p)) for p in PROMPTS[:2])
    out = client.completions.create(model="a2", prompt=[ids, ids[:3]], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [oracle.text(ids, "a2", 6)] * 2 + [oracle.text(ids[:3], "a2", 6)] * 2
    chunks = list(client.completions.create(model="a2", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=8, temperature=0,
                                            stream=True))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {0: oracle.completion(PROMPTS[0], "a2", 8), 1: oracle.completion(PROMPTS[1], "a2", 8)}


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_n_sampled_choices_equal_solo_runs_with_seed_plus_i(client, chat, stream):
    base = dict(model="a3", max_tokens=8, temperature=1.0, seed=11)
    messages = [{"role": "user", "content": "hello"}]

    def run(n, seed):
        kw = {**base, "seed": seed, "n": n, "stream": stream}
        res = client.chat.completions.create(messages=messages, **kw) if chat else \
            client.completions.create(prompt="hello", **kw)
        texts: dict[int, str] = {}
        if not stream:
            return {c.index: (c.message.content if chat else c.text) for c in res.choices}
        for chunk in res:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + ((c.delta.content or "") if chat else c.text)
        return texts

    together = run(3, 11)
    assert sorted(together) == [0, 1, 2]
    assert [together[i] for i in range(3)] == [run(1, 11 + i)[0] for i in range(3)]
    assert len(set(together.values())) > 1  # sampling with different seeds: not three copies


# ------------------------------------------------------------------------------ logprobs, echo, bias


def test_completion_logprobs_and_echo_equal_the_oracle(client, oracle):
    prompt = "hello world"
    ids = oracle.prompt_ids(prompt)
    new = oracle.greedy_ids(ids, "a4", 5)[:5]
    want = oracle.logprobs(ids + new, "a4", 3)
    out = client.completions.create(model="a4", prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(new)
    for j, (got, (logprob, top)) in enumerate(zip(lp.token_logprobs, want[len(ids) - 1:])):
        assert got == pytest.approx(logprob, abs=1e-4)
        assert list(lp.top_logprobs[j].values()) == pytest.approx([v for _, v in top][:len(lp.top_logprobs[j])], abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    echoed = client.completions.create(model="a4", prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True)
    c = echoed.choices[0]
    assert c.text == prompt + out.choices[0].text
    assert len(c.logprobs.tokens) == len(ids) + len(new)
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    for got, (logprob, _) in zip(c.logprobs.token_logprobs[1:], want):
        assert got == pytest.approx(logprob, abs=1e-4)
    plain_echo = client.completions.create(model="a4", prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert plain_echo.choices[0].text == c.text and plain_echo.choices[0].logprobs is None
    chunks = list(client.completions.create(model="a4", prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(c.logprobs.token_logprobs, abs=1e-6) or streamed[0] is None


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_shape_and_values(client, oracle, stream):
    messages = [{"role": "user", "content": "hello"}]
    ids = oracle.chat_ids(messages)
    new = oracle.greedy_ids(ids, "a5", 4)[:4]
    want = oracle.logprobs(ids + new, "a5", 5)[len(ids) - 1:]
    res = client.chat.completions.create(model="a5", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=5, stream=stream)
    if stream:
        content = [x for ch in res if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    else:
        content = res.choices[0].logprobs.content
    assert len(content) == len(new)
    for item, (logprob, top) in zip(content, want):
        assert item.logprob == pytest.approx(logprob, abs=1e-4)
        assert len(item.top_logprobs) == 5 and item.bytes == list(item.token.encode("utf-8"))
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
    plain = client.chat.completions.create(model="a5", messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logit_bias_is_applied(client, oracle):
    ids = oracle.prompt_ids("hello world")
    natural = oracle.greedy_ids(ids, "a6", 3)
    target = next(t for t in range(10, 300) if t not in natural and t != oracle.eos)
    out = client.completions.create(model="a6", prompt="hello world", max_tokens=3, temperature=0,
                                    logit_bias={str(target): 100})
    assert out.choices[0].text == oracle.tokenizer.decode([target] * 3)
    banned = client.completions.create(model="a6", prompt="hello world", max_tokens=1, temperature=0,
                                       logit_bias={str(natural[0]): -100})
    assert banned.choices[0].text != oracle.tokenizer.decode(natural[:1])


# ------------------------------------------------------------------------------ structured outputs

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "n"], "additionalProperties": False}
SCHEMA2 = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}


def test_structured_outputs_parse_and_validate_in_a_mixed_batch(server, oracle):
    fmt = lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": True}}
    jobs = [("a0", fmt(SCHEMA), SCHEMA), ("a1", fmt(SCHEMA2), SCHEMA2), ("a2", None, None),
            ("tiny-base", fmt(SCHEMA2), SCHEMA2), ("a3", fmt(SCHEMA), SCHEMA), ("a4", None, None)]
    results: dict[int, object] = {}

    def one(i, model, rf):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        kw = {"response_format": rf} if rf else {}
        results[i] = c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[i % 3]}],
                                               max_tokens=60, temperature=0, **kw)

    threads = [threading.Thread(target=one, args=(i, m, rf)) for i, (m, rf, _) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    # json_object bounds nothing (a string may run on): a prompt whose greedy object closes on the tiny model
    obj = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).completions.create(
        model="tiny-base", prompt="hello world", max_tokens=120, temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].text), dict)
    for i, (model, rf, schema) in enumerate(jobs):
        choice = results[i].choices[0]
        messages = [{"role": "user", "content": PROMPTS[i % 3]}]
        if schema is None:  # free rows beside constrained ones: exactly their solo answer
            assert choice.message.content == oracle.chat(messages, None if model == "tiny-base" else model, 60)
        else:
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_unenforceable_schema_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}})
    assert err.value.body["param"] == "response_format"


# ------------------------------------------------------------------------------ runtime loading


def test_load_lora_adapter_runs_full_validation(server, tiny_world):
    with raw(server) as c:
        load = lambda name, path: c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        resp = load("x_other", str(tiny_world["runtime"] / "other_model"))
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_adapter", resp.text
        resp = load("x_mts", str(tiny_world["runtime"] / "mts_no_weights"))
        assert resp.status_code == 400 and "modules_to_save" in resp.json()["error"]["message"], resp.text
        resp = load("x_missing", str(tiny_world["runtime"] / "no_such_dir"))
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "adapter_not_found", resp.text
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert not {"x_other", "x_mts", "x_missing"} & set(models)


def test_load_inplace_swaps_while_running_requests_finish_on_the_old_weights(server, client, oracle, tiny_world):
    with raw(server) as c:
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(tiny_world["good"])}).status_code == 200
        stream = client.completions.create(model="hot", prompt="hello world", max_tokens=40, temperature=0, stream=True)
        it = iter(stream)
        first = next(it)  # running now, on the old weights
        resp = c.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(tiny_world["adapters"]["a0"]),
                                                     "load_inplace": True})
        assert resp.status_code == 200, resp.text
        text = first.choices[0].text + "".join(ch.choices[0].text for ch in it if ch.choices)
        assert text == oracle.completion("hello world", "good", 40)
        after = client.completions.create(model="hot", prompt="hello world", max_tokens=8, temperature=0)
        assert after.choices[0].text == oracle.completion("hello world", "a0", 8)
        resp = c.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(tiny_world["good"])})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "adapter_exists"

