"""Server-sent events tied to the request's lifetime, and disconnect detection before the first byte.

Why not plain ``StreamingResponse``: when the client goes away, Starlette stops iterating but does
not promise to close the generator, so the engine would keep decoding for nobody until garbage
collection. ``EventStreamResponse`` always runs ``on_close`` (which cancels the engine request and
frees its batch slot) and closes the generator, whichever side ends first.
``until_disconnect`` does the same for the time before a response exists (queueing, prefill, a
non-streaming request): it races the work against the client's ``http.disconnect``.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def sse(payload: dict[str, Any] | str) -> str:
    """One SSE event: ``data: <json>`` and a blank line (``[DONE]`` is sent as a bare string)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T:
    """Await ``work``; if the client disconnects first, call ``on_disconnect`` and raise ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        on_disconnect()
        work_task.cancel()
        raise
    finally:
        watch_task.cancel()
    if work_task in done:
        return work_task.result()
    on_disconnect()
    work_task.cancel()
    raise ClientDisconnected()


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` whose producer is cancelled and closed when either side stops."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream_task = asyncio.ensure_future(self.stream_response(send))
        watch_task = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({stream_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if stream_task in done:
                exc = stream_task.exception()
                if exc is not None and not isinstance(exc, OSError):  # OSError: the peer went away mid-send
                    raise exc
            else:
                logger.debug("client disconnected mid-stream; cancelling its request")
        except asyncio.CancelledError:
            # the server cancels this task (shutdown grace period over): end quietly, not as an
            # "Exception in ASGI application" with a traceback in the log
            logger.info("stream cancelled by the server shutdown")
        finally:
            self._on_close()  # cancel the engine request first: frees its slot at the next step
            for task in (stream_task, watch_task):
                task.cancel()
            await asyncio.shield(asyncio.gather(stream_task, watch_task, return_exceptions=True))
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
