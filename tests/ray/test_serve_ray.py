"""loramux on Ray Serve: 2 engine replicas (1 thread each) behind the ingress, checked against the
single-process server's own answers. One Ray instance and one app for the whole module (conftest.py);
the replica-kill test runs last because it replaces a replica."""
from __future__ import annotations

import collections
import json
import os
import signal
import threading

import httpx
import pytest

from conftest import KEY, N_ADAPTERS, options_for, wait_for

pytestmark = pytest.mark.ray
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["the quick brown fox", "select name from users", "hello world", "one two three"]
ADAPTERS = [f"a{i}" for i in range(N_ADAPTERS)]
CHAT = [{"role": "user", "content": "reverse the order of these words please"}]


def completion(url, model, prompt, max_tokens=8, stream=False, timeout=120, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=timeout)


def chat(url, model, stream=False, max_tokens=8, timeout=120):
    body = {"model": model, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=timeout)


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    return [json.loads(e) for e in events[:-1]]


def streamed_text(resp, chat_mode=False) -> str:
    assert resp.status_code == 200, resp.text
    parts = []
    for event in sse_events(resp.text):
        for choice in event.get("choices", []):
            parts.append((choice.get("delta", {}).get("content") or "") if chat_mode else choice.get("text", ""))
    return "".join(parts)


def assert_openai_error(body: dict, status_hint: str | None = None) -> None:
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert "Traceback" not in json.dumps(body)


@pytest.fixture(scope="module")
def local(ray_world):
    """The single-process server over the same base model and adapters (the oracle), without a socket."""
    from fastapi.testclient import TestClient

    from loramux.ray.replica import engine_args
    from loramux.server.app import create_app
    from loramux.server.command import build_engine, server_config_options
    from loramux.server.config import ServerConfig

    args = engine_args(options_for(ray_world))
    engine, tokenizer, registry = build_engine(args)
    app = create_app(engine, tokenizer, ServerConfig(**server_config_options(args)), registry=registry)
    with TestClient(app) as client:
        client.headers.update(AUTH)
        yield client
    engine.shutdown(abort=True, timeout=5.0)


def local_completion(local, model, prompt, max_tokens=8):
    r = local.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_answers_equal_the_single_process_server_for_every_adapter(ray_serve, local):
    url = ray_serve["url"]
    for model in ["tiny-base", *ADAPTERS]:
        for prompt in PROMPTS:
            r = completion(url, model, prompt)
            assert r.status_code == 200, r.text
            assert r.headers["x-loramux-replica"]
            assert r.json()["choices"][0]["text"] == local_completion(local, model, prompt), (model, prompt)
        r = chat(url, model)
        expected = local.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 8,
                                                             "temperature": 0}).json()
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    # the adapters change the answers (else the comparison above proves little)
    assert len({local_completion(local, m, PROMPTS[0]) for m in ["tiny-base", *ADAPTERS]}) >= 4


def test_affinity_each_adapters_requests_land_on_one_replica(ray_serve):
    url = ray_serve["url"]
    seen: dict[str, list[str]] = collections.defaultdict(list)
    for round_ in range(10):
        for model in ADAPTERS:
            r = completion(url, model, PROMPTS[round_ % len(PROMPTS)], max_tokens=2)
            assert r.status_code == 200, r.text
            seen[model].append(r.headers["x-loramux-replica"])
    for model, replicas in seen.items():
        after_first = replicas[1:]
        top = collections.Counter(after_first).most_common(1)[0][1]
        assert top / len(after_first) >= 0.9, (model, replicas)
    # Which replica is an adapter's home is a rendezvous hash of Ray's random replica ids: all four adapters
    # land on one replica in 1 run of 8 (it failed a fresh-clone run so), so the spread over replicas is
    # tested on the policy with fixed ids (tests/ray/test_routing.py), not here.


def test_streaming_equals_non_streaming(ray_serve):
    url = ray_serve["url"]
    for model in ["tiny-base", "a1", "a2"]:
        plain = completion(url, model, PROMPTS[1], max_tokens=12)
        streamed = completion(url, model, PROMPTS[1], max_tokens=12, stream=True)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers["x-loramux-replica"]
        assert streamed_text(streamed) == plain.json()["choices"][0]["text"]
        plain_chat = chat(url, model, max_tokens=12)
        assert streamed_text(chat(url, model, stream=True, max_tokens=12), chat_mode=True) == \
            plain_chat.json()["choices"][0]["message"]["content"]


def test_unknown_model_is_a_404_listing_the_models(ray_serve):
    r = completion(ray_serve["url"], "no-such-adapter", "hi")
    assert r.status_code == 404, r.text
    assert_openai_error(r.json())
    assert "a0" in r.json()["error"]["message"] and r.json()["error"]["code"] == "model_not_found"
    assert r.headers["x-loramux-replica"].startswith("ingress")
    models = httpx.get(ray_serve["url"] + "/v1/models", headers=AUTH, timeout=30).json()
    assert {"tiny-base", *ADAPTERS} <= {m["id"] for m in models["data"]}


def test_auth_as_in_the_plain_server(ray_serve):
    url = ray_serve["url"]
    body = {"model": "a0", "prompt": "hi", "max_tokens": 2}
    missing = httpx.post(url + "/v1/completions", json=body, timeout=30)
    wrong = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    for r, code in ((missing, "missing_api_key"), (wrong, "invalid_api_key")):
        assert r.status_code == 401, r.text
        assert_openai_error(r.json())
        assert r.json()["error"]["code"] == code
        assert r.headers["x-loramux-replica"]
    assert httpx.get(url + "/health", timeout=30).status_code == 200  # /health and /metrics need no key
    assert httpx.post(url + "/v1/completions", json=body, headers={"X-API-Key": KEY}, timeout=60).status_code == 200


def test_metrics_show_each_replicas_adapters_loads_and_evictions(ray_serve):
    url = ray_serve["url"]
    for model in ADAPTERS:  # every replica that holds an adapter has served it by now; refresh their reports
        assert completion(url, model, "hi", max_tokens=1).status_code == 200
    text = httpx.get(url + "/metrics", timeout=30).text
    rows = httpx.get(url + "/replicas", timeout=30).json()["data"]
    assert 1 <= len(rows) <= 2, rows
    # A replica may hold no adapter: the rendezvous hash of Ray's random replica ids homes all four on one
    # replica in about 1 run of 8, and the other still reports (it served tiny-base). It failed CI so.
    assert any(row["adapters"] for row in rows), rows
    for row in rows:
        assert row["resident_adapters"] == len(row["adapters"]), row
        assert row["loads"] >= len(row["adapters"]) and row["evictions"] >= 0
        assert f'loramux_replica_adapters_resident{{replica="{row["replica"]}"}}' in text
        assert f'loramux_replica_adapter_loads_total{{replica="{row["replica"]}"}}' in text
        assert f'loramux_replica_adapter_evictions_total{{replica="{row["replica"]}"}}' in text
        for adapter in row["adapters"]:
            assert f'loramux_replica_resident_adapter{{adapter="{adapter}",replica="{row["replica"]}"}} 1.0' in text
    resident = [a for row in rows for a in row["adapters"]]
    assert sorted(resident) == ADAPTERS  # affinity: each adapter resident once across the fleet
    assert "loramux_adapter_loads_total" in text  # the plain server's series, summed over the replicas


def test_runtime_load_and_unload_reach_the_replicas(ray_serve, local):
    url = ray_serve["url"]
    expected = None
    for attempt in range(2):  # load, serve, unload; then the same name again (a new key on the replicas)
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(ray_serve["world"]["good"])},
                       headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        texts = set()
        for _ in range(4):
            r = completion(url, "fresh", PROMPTS[0])
            assert r.status_code == 200, r.text
            texts.add(r.json()["choices"][0]["text"])
        assert len(texts) == 1
        expected = expected or local_completion(local, "good", PROMPTS[0])  # `good` is the same directory
        assert texts == {expected}
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        r = completion(url, "fresh", PROMPTS[0])
        assert r.status_code == 404, r.text
    bad = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}, headers=AUTH,
                     timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "path_outside_root", bad.text


def _engine_replicas_running() -> int:
    from ray import serve

    app = serve.status().applications.get("loramux")
    if app is None:
        return 0
    deployment = app.deployments["loramux_engine"]
    return deployment.replica_states.get("RUNNING", 0) if deployment.status == "HEALTHY" else 0


def test_killing_a_replica_under_traffic_gives_clean_errors_then_full_service(ray_serve):
    """The victim is frozen (SIGSTOP) by the stream thread that reads the victim's first token, before that
    thread reads anything else: that stream still has 479 tokens to go, so it is mid-generation when SIGKILL
    lands, whatever the machine's load (waiting for all four streams' first chunks, as before, gave the early
    ones that time to finish). Streams the frozen victim had not started yet must end cleanly too (a 503)."""
    url = ray_serve["url"]
    for model in ADAPTERS:  # replicas report their adapters with the requests they take (self-contained with -k)
        assert completion(url, model, "hi", max_tokens=1).status_code == 200
    # a replica holding one of the four (the other may hold none, or only an adapter loaded at runtime earlier)
    rows = wait_for(lambda: [r for r in httpx.get(url + "/replicas", timeout=30).json()["data"]
                             if set(r["adapters"]) & set(ADAPTERS)], 60, "a replica reporting its adapters")
    victim = rows[0]
    mine = [a for a in ADAPTERS if a in victim["adapters"]]
    assert mine, rows
    frozen, freeze_lock = threading.Event(), threading.Lock()
    results: list = [None] * 4

    def freeze() -> None:
        with freeze_lock:
            if not frozen.is_set():
                os.kill(victim["pid"], signal.SIGSTOP)
                frozen.set()

    def stream(i: int) -> None:
        body = {"model": mine[i % len(mine)], "prompt": "hello", "max_tokens": 480, "temperature": 0,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
                served_by = r.headers.get("x-loramux-replica")
                if r.status_code != 200:
                    results[i] = (r.status_code, served_by, json.loads(r.read()))
                    return
                chunks = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        if served_by == victim["replica"]:
                            freeze()
                        chunks.append(line[6:])
                results[i] = (r.status_code, served_by, chunks)
        except Exception as exc:  # a broken connection would be a defect: record it
            results[i] = ("exception", repr(exc), [])

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    assert frozen.wait(120), f"no stream reached the victim: {results}"
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a request hung after its replica died"
    cut = 0
    for status, served_by, chunks in results:
        if status == 503:  # routed to the victim, frozen before it started: a clean error, never a hang
            assert_openai_error(chunks)
            continue
        assert status == 200, (status, served_by)  # a started stream's error comes as an event
        assert chunks[-1] == "[DONE]", chunks[-3:]
        last = json.loads(chunks[-2])
        if "error" in last:
            assert_openai_error(last)
            assert last["error"]["code"] == "replica_unavailable" and served_by == victim["replica"], last
            cut += 1
    assert cut >= 1, "the stream that froze the victim was not cut: it had finished 480 tokens first"

    # non-streaming requests meanwhile: never a hang, either an answer or a clean 503
    for model in ADAPTERS:
        r = completion(url, model, "hi", max_tokens=2, timeout=120)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert_openai_error(r.json())

    wait_for(lambda: _engine_replicas_running() == 2, 240, "Ray to replace the killed replica")

    def full_service() -> bool:
        served = set()
        for model in ADAPTERS:
            r = completion(url, model, "hi", max_tokens=2)
            if r.status_code != 200:
                return False
            served.add(r.headers["x-loramux-replica"])
        return victim["replica"] not in served

    wait_for(full_service, 120, "every adapter to be served again")
    rows = httpx.get(url + "/replicas", timeout=30).json()["data"]
    assert victim["replica"] not in {row["replica"] for row in rows}
