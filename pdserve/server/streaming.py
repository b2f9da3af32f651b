"""HTTP plumbing shared by the APIs: SSE framing, reading JSON bodies, aborting on client disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pdserve.server.errors import BadRequestError, error_body

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
_DISCONNECT_POLL_S = 0.5


class ClientDisconnected(Exception):
    pass


def sse_event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_error(message: str, status: int) -> bytes:
    return sse_event(error_body(message, status))


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    """Starlette cancels `events` when the client disconnects, which aborts the requests behind it."""
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def json_response(obj: object, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


async def read_json(request: Request) -> object:
    body = await request.body()
    if not body.strip():
        raise BadRequestError("the request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequestError(f"malformed JSON body: {e}") from None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel it (aborting its requests) and raise."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
