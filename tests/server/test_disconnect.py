"""A client that goes away cancels its engine request (frees its slot), whether it leaves
mid-stream, while the request still waits for its first token, or during a non-streaming call.
Driven through raw ASGI calls so the disconnect happens exactly where the test wants it, and a
gated fake engine that lets tokens out only when the test allows: nothing races a clock."""
from __future__ import annotations

import asyncio
import json

import pytest

from loramux.cache import AdapterRegistry
from loramux.server import create_app
from srv_fake_engine import FakeEngine, Gate


async def call(app, path: str, body: dict, *, disconnect_after_chunks: int | None = None,
               disconnect_when=None) -> list[dict]:
    """Run one request through the ASGI app; the client leaves after ``disconnect_after_chunks`` body
    chunks, or as soon as ``disconnect_when()`` (a blocking wait, run in a thread) returns."""
    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    gone = asyncio.Event()
    sent: list[dict] = []
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set():
            raise OSError("client went away")
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if disconnect_after_chunks is not None and len(chunks) >= disconnect_after_chunks:
            gone.set()

    async def watcher():
        assert await asyncio.to_thread(disconnect_when), "the condition to disconnect on never held"
        gone.set()

    if disconnect_when is not None:
        asyncio.ensure_future(watcher())
    await asyncio.wait_for(app(scope, receive, send), timeout=30)  # a guard only: every step is event-driven
    return sent


@pytest.fixture
def engine(tiny_world):
    registry = AdapterRegistry()
    registry.add_root(tiny_world["root"])
    fake = FakeEngine(registry, tokenizer=tiny_world["tokenizer"], max_context=4096)
    fake.gate = Gate()  # tokens come out only when a test allows them
    return fake


def wait_idle(engine: FakeEngine) -> None:
    assert engine.wait_for(lambda e: e.running == 0), "the fake engine kept running after the cancel"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_disconnect_mid_stream_cancels_the_request(engine, path):
    app = create_app(engine, base_name="tiny")
    body = {"model": "a1", **({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}),
            "max_tokens": 500, "stream": True}
    engine.gate.allow(3)  # three tokens, then the fake waits for a permit that never comes
    chunks = 4 if "chat" in path else 3  # chat: the role chunk first
    sent = asyncio.run(call(app, path, body, disconnect_after_chunks=chunks))
    assert sent[0]["status"] == 200
    assert len(engine.cancelled) == 1
    wait_idle(engine)  # the fake stops at its next token, like the engine at its next step
    text = b"".join(m.get("body", b"") for m in sent).decode()
    assert "[DONE]" not in text
    assert engine.produced <= 3


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_first_token_cancels_the_request(engine, stream):
    engine.stall = True  # queued forever: nothing is ever produced unless cancelled
    app = create_app(engine, base_name="tiny")
    body = {"model": "a2", "prompt": "x", "max_tokens": 5, "stream": stream}
    asyncio.run(call(app, "/v1/completions", body, disconnect_when=lambda: engine.wait_for(lambda e: e.submitted)))
    assert len(engine.cancelled) == 1
    wait_idle(engine)
    text = app.state.loramux.metrics.render().decode()
    assert 'loramux_requests_total{endpoint="completions",finish_reason="abort",model="a2"} 1.0' in text


def test_non_streaming_disconnect_mid_generation_cancels(engine):
    app = create_app(engine, base_name="tiny")
    engine.gate.allow(2)  # two tokens produced, the third waits: the client leaves in between
    asyncio.run(call(app, "/v1/completions", {"model": "a3", "prompt": "x", "max_tokens": 500},
                     disconnect_when=lambda: engine.wait_for(lambda e: e.produced == 2)))
    assert len(engine.cancelled) == 1
    wait_idle(engine)
    assert engine.produced == 2


def test_finished_stream_cancels_nothing(engine):
    engine.gate.allow(3)
    app = create_app(engine, base_name="tiny")
    sent = asyncio.run(call(app, "/v1/completions", {"model": "a1", "prompt": "x", "max_tokens": 3, "stream": True}))
    assert b"[DONE]" in b"".join(m.get("body", b"") for m in sent)
    assert engine.cancelled == []
