"""The gate every HTTP request passes first: API key, body size, error counting.

A pure ASGI middleware rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
wraps ``receive`` and would hide the client's ``http.disconnect`` from streaming responses, which
is how a dropped client cancels its request. Auth runs before the body is read, so a request
without a key gets 401 whatever its body holds; the body is read here, up to the limit, and then
replayed to the app, so an oversized body is refused with 413 before any JSON parsing.
"""
from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError
from .security import check_api_key

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class GateMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int, api_key: str | None, errors: Any) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.api_key = api_key
        self.errors = errors  # prometheus Counter labelled by status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.errors.labels(str(message["status"])).inc()
            await send(message)

        headers = Headers(scope=scope)
        if scope["path"].startswith("/v1/"):
            try:
                check_api_key(headers.get("authorization"), headers.get("x-api-key"), self.api_key)
            except APIError as exc:
                await _reply(counting_send, exc.status, exc.body(), exc.headers)
                return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, counting_send)
            return

        too_big = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _reply(counting_send, 413, too_big.body())
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reply(counting_send, 413, too_big.body())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect is left to wait for

        await self.app(scope, replay, counting_send)


async def _reply(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})
