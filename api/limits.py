"""Request limits enforced before a route runs: header size, declared body size, and time between body pieces."""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_HEADER_BYTES = 32 * 1024


def _reject(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers={"connection": "close"})


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_read_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            await _reject(431, f"Request headers are larger than {MAX_HEADER_BYTES} bytes.",
                          "request_headers_too_large")(scope, receive, send)
            return
        declared = next((v for k, v in headers if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reject(413, f"The request body is larger than the {self.max_body_bytes} byte limit.",
                          "request_too_large")(scope, receive, send)
            return

        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if not chunked and (declared is None or declared == b"0"):
            await self.app(scope, receive, send)  # no body to wait for (most GETs): nothing to time
            return

        async def receive_with_timeout() -> Message:
            try:
                return await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"The request body did not arrive within {self.timeout_s:g} s.") from None

        await self.app(scope, receive_with_timeout, send)
