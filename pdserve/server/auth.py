"""--api-key: every route but /health needs `Authorization: Bearer KEY` (a pure ASGI middleware, so that
streaming and disconnect detection are untouched)."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.server.errors import error_response

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response("invalid or missing API key (expected 'Authorization: Bearer <key>')", 401)
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return secrets.compare_digest(value, self._expected)
        return False


MAX_REQUEST_ID_BYTES = 256


class RequestIdMiddleware:
    """Echo a caller's `X-Request-Id` (SMG and other gateways send one per request) on the response, so a gateway's
    logs and the worker's answer correlate. Oversized or non-printable ids are not echoed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = None
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"x-request-id" and len(value) <= MAX_REQUEST_ID_BYTES and value.isascii() \
                        and value.decode().isprintable():
                    request_id = value
        if request_id is None:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
