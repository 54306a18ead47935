"""The real thing: ``loramux serve`` in a subprocess on a loopback port, a tiny seeded model and
PEFT-made adapters, talked to with the official ``openai`` client. Every answer is compared with
``MultiLoraModel.generate`` run alone for that adapter (greedy)."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from srv_process import ServerProcess

KEY = "sk-loopback-test"
ADAPTERS = [f"a{i}" for i in range(8)]
PROMPTS = ["hello world", "select name from users", "the quick brown fox", "Maria is 34"]


@pytest.fixture(scope="module")
def server(tiny_world, tmp_path_factory):
    args = ["--base", str(tiny_world["base"]), "--served-model-name", "tiny-base",
            "--adapter-root", str(tiny_world["root"]), "--adapter-root", str(tiny_world["runtime"]),
            "--allow-runtime-loading", "--api-key", KEY, "--threads", "1",
            "--max-loaded-adapters", "5", "--max-running", "12", "--max-body-bytes", "65536"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("serve") / "serve.log")
    yield proc
    rc = proc.stop(signal.SIGTERM)
    assert rc == 0, f"loramux serve exited with {rc} on SIGTERM:\n{proc.log()}"
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def metric(server, name: str, labels: dict | None = None) -> float:
    text = httpx.get(server.url + "/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def test_models_lists_base_and_adapters(client, tiny_world):
    models = {m.id: m for m in client.models.list()}
    assert "tiny-base" in models and set(ADAPTERS) <= set(models)
    assert models["a3"].model_extra["parent"] == "tiny-base"
    assert models["a3"].model_extra["root"] == str(tiny_world["adapters"]["a3"])


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_completion_and_chat_per_adapter_equal_multilora_solo(client, oracle, adapter):
    model = adapter or "tiny-base"
    prompt = PROMPTS[hash(model) % len(PROMPTS)]
    out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    assert out.model == model
    assert out.choices[0].text == oracle.completion(prompt, adapter, 10)
    assert out.usage.prompt_tokens == len(oracle.prompt_ids(prompt))

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == oracle.chat(messages, adapter, 10)
    assert chat.choices[0].message.role == "assistant"

    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_32_concurrent_requests_over_8_adapters_equal_solo(server, oracle):
    jobs = [(ADAPTERS[i % 8], PROMPTS[i % len(PROMPTS)] + " " * (i // 8), i % 2 == 0, i % 3 == 0) for i in range(32)]

    async def one(aclient, adapter, prompt, stream, chat):
        messages = [{"role": "user", "content": prompt}]
        if chat:
            if stream:
                parts = [c.choices[0].delta.content or "" async for c in await aclient.chat.completions.create(
                    model=adapter, messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices]
                return "".join(parts), oracle.chat(messages, adapter, 12)
            r = await aclient.chat.completions.create(model=adapter, messages=messages, max_tokens=12, temperature=0)
            return r.choices[0].message.content, oracle.chat(messages, adapter, 12)
        if stream:
            parts = [c.choices[0].text async for c in await aclient.completions.create(
                model=adapter, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices]
            return "".join(parts), oracle.completion(prompt, adapter, 12)
        r = await aclient.completions.create(model=adapter, prompt=prompt, max_tokens=12, temperature=0)
        return r.choices[0].text, oracle.completion(prompt, adapter, 12)

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=180) as aclient:
            return await asyncio.gather(*(one(aclient, *job) for job in jobs))

    results = asyncio.run(main())
    mismatches = [(job, got, want) for job, (got, want) in zip(jobs, results) if got != want]
    assert not mismatches, mismatches[:3]
    # the solo answers differ between adapters: equality above would catch cross-talk
    assert len({want for _, want in results}) >= 8


def test_runtime_load_and_unload_while_other_requests_run(server, client, oracle, tiny_world):
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def worker(adapter: str, prompt: str) -> None:
        try:
            parts = [c.choices[0].text for c in client.completions.create(
                model=adapter, prompt=prompt, max_tokens=40, temperature=0, stream=True) if c.choices]
            results[adapter + prompt] = "".join(parts)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(a, p)) for a in ADAPTERS[:6] for p in PROMPTS[:2]]
    for t in threads:
        t.start()
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    for round_ in range(3):
        name = f"rt{round_}"
        resp = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(tiny_world["good"])})
        assert resp.status_code == 200, resp.text
        out = client.completions.create(model=name, prompt="hello world", max_tokens=8, temperature=0)
        assert out.choices[0].text == oracle.completion("hello world", "good", 8)
        resp = admin.post("/v1/unload_lora_adapter", json={"lora_name": name})
        assert resp.status_code == 200, resp.text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="x", max_tokens=1)
    for t in threads:
        t.join(120)
    assert not errors, errors
    for adapter in ADAPTERS[:6]:
        for prompt in PROMPTS[:2]:
            assert results[adapter + prompt] == oracle.completion(prompt, adapter, 40)


def test_bad_input_gets_the_right_status_and_the_server_keeps_answering(server, client, oracle, tiny_world):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert "no-such-adapter" in str(err.value) and "tiny-base" in str(err.value) and "a7" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a0", prompt="x", max_tokens=-5)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):  # longer than the context
        client.completions.create(model="a0", prompt="one two three " * 300, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="could not be loaded"):  # corrupt weights under a root
        client.completions.create(model="corrupt", prompt="x", max_tokens=2)

    raw = httpx.Client(base_url=server.url, timeout=30)
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    assert raw.get("/v1/models").status_code == 401
    resp = raw.post("/v1/completions", content=b'{"model": "a0", "prompt": ', headers=auth)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    resp = raw.post("/v1/completions", content=json.dumps({"model": "a0"}), headers=auth)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    resp = raw.post("/v1/completions", content=json.dumps({"model": "a0", "prompt": "x" * 70000}), headers=auth)
    assert resp.status_code == 413
    for path in ["../outside/evil", str(tiny_world["runtime"] / ".." / "outside" / "evil"),
                 str(tiny_world["runtime"] / "link_out")]:
        resp = raw.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path}, headers=auth)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "path_outside_root", (path, resp.text)
    resp = raw.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tiny_world["corrupt"])},
                    headers=auth)
    assert resp.status_code == 400 and "invalid adapter" in resp.json()["error"]["message"]
    for resp in [raw.get("/v1/nothing", headers=auth)]:
        assert resp.status_code == 404 and "error" in resp.json()
    assert metric(server, "loramux_http_errors_total", {"status": "500"}) == 0

    out = client.completions.create(model="a1", prompt="hello world", max_tokens=8, temperature=0)
    assert out.choices[0].text == oracle.completion("hello world", "a1", 8)


def test_client_disconnect_mid_stream_frees_its_slot(server):
    aborted_before = metric(server, "loramux_requests_total", {"finish_reason": "abort"})
    with httpx.Client(base_url=server.url, timeout=30) as raw:
        with raw.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "a2", "prompt": "hello", "max_tokens": 500, "stream": True,
                              "ignore_eos": True}) as resp:
            assert resp.status_code == 200
            next(resp.iter_lines())  # the first event arrived: the request is running; now leave
    deadline = time.monotonic() + 120  # a hang guard; the loop ends on its condition
    while time.monotonic() < deadline:
        if metric(server, "loramux_requests_running") == 0 and \
                metric(server, "loramux_requests_total", {"finish_reason": "abort"}) > aborted_before:
            break
        time.sleep(0.1)
    assert metric(server, "loramux_requests_running") == 0
    assert metric(server, "loramux_requests_total", {"finish_reason": "abort"}) > aborted_before


def test_metrics_expose_the_issue_series(server, client):
    steps_before, decode_before = metric(server, "loramux_engine_steps_total"), metric(server, "loramux_engine_decode_seconds_total")
    client.completions.create(model="a4", prompt="hello", max_tokens=4, temperature=0)
    # one step per generated token (this request ran alone), one more at most for a prefill of its own
    assert steps_before + 4 <= metric(server, "loramux_engine_steps_total") <= steps_before + 5
    assert metric(server, "loramux_engine_decode_seconds_total") > decode_before
    text = httpx.get(server.url + "/metrics").text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for name in ["loramux_requests_total", "loramux_prompt_tokens_total", "loramux_generation_tokens_total",
                 "loramux_time_to_first_token_seconds_bucket", "loramux_inter_token_latency_seconds_bucket",
                 "loramux_requests_running", "loramux_requests_waiting", "loramux_adapters_resident",
                 "loramux_adapter_loads_total", "loramux_adapter_evictions_total", "loramux_adapter_load_errors_total",
                 "loramux_prefix_cache_hit_tokens_total", "loramux_prefix_cache_bytes", "loramux_prefix_cache_entries"]:
        assert name in names, name
    assert metric(server, "loramux_generation_tokens_total", {"model": "a4"}) >= 4
    hit_before = metric(server, "loramux_prefix_cache_hit_tokens_total")
    prompt = "the same prompt of several tokens, twice"
    for _ in range(2):
        client.completions.create(model="a4", prompt=prompt, max_tokens=1, temperature=0)
    assert metric(server, "loramux_prefix_cache_hit_tokens_total") > hit_before  # the second reused the first's KV
    errors_before = metric(server, "loramux_adapter_load_errors_total")
    with pytest.raises(openai.BadRequestError, match="could not be loaded"):  # truncated weights under a root
        client.completions.create(model="corrupt", prompt="x", max_tokens=2)
    assert metric(server, "loramux_adapter_load_errors_total") == errors_before + 1


def test_sigint_during_a_stream_exits_zero(tiny_world, tmp_path):
    proc = ServerProcess(["--base", str(tiny_world["base"]), "--adapter-root", str(tiny_world["root"]),
                          "--threads", "1", "--shutdown-timeout", "0.5"], tmp_path / "serve.log")
    got: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", proc.url + "/v1/completions", timeout=60,
                              json={"model": "a1", "prompt": "hello", "max_tokens": 500, "stream": True,
                                    "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    got.append(line)
        except httpx.HTTPError:
            got.append("<closed>")

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 120  # a hang guard; the loop ends on its condition
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got, proc.log()
    assert proc.stop(signal.SIGINT) == 0, proc.log()
    t.join(30)
    assert "Traceback" not in proc.log(), proc.log()
    assert "shut down cleanly" in proc.log()
    # the running stream was finished or aborted properly (a final chunk and [DONE]), not cut off
    events = [line for line in got if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", got[-3:]
    final = json.loads(events[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] in ("length", "abort")
