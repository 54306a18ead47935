"""loramux on Ray Serve: 2 engine replicas (1 thread each) behind the ingress, against the single-process
server's own answers. One Ray instance and app for the whole module (see conftest.py)."""
from __future__ import annotations

import collections
import json

import httpx
import pytest

from conftest import KEY, N_ADAPTERS, options_for, wait_for

pytestmark = pytest.mark.ray
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["the quick brown fox", "select name from users", "hello world", "one two three"]


def complete(url, model, prompt, max_tokens=8, stream=False, timeout=120):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=timeout)


def sse_text(resp) -> str:
    events = [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", resp.text[-300:]
    return "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])


def test_smoke(ray_serve):
    r = complete(ray_serve["url"], "a0", "hello world")
    assert r.status_code == 200, r.text
    assert r.headers["x-loramux-replica"]
    print(r.json(), r.headers)
