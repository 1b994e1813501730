"""Request limits enforced before a route runs: header size, declared body size, the time between body pieces and
the time for the whole body. (The time for the headers is api/protocol.py's: a middleware sees a request only once
its headers are in.)"""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_HEADER_BYTES = 32 * 1024


def _reject(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers={"connection": "close"})


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_read_timeout_s: float,
                 body_deadline_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = body_read_timeout_s
        self.deadline_s = body_deadline_s

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

        deadline = time.monotonic() + self.deadline_s
        body_done = False

        async def receive_with_timeout() -> Message:
            nonlocal body_done
            if body_done:  # after the body only a disconnect can come: nothing to time
                return await receive()
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), min(self.timeout_s, remaining))
            except asyncio.TimeoutError:
                raise body_timeout(self.timeout_s, self.deadline_s, whole=remaining <= self.timeout_s) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_with_timeout, send)


def body_timeout(piece_s: float, whole_s: float, *, whole: bool) -> HTTPException:
    """The 408 for a body that stalled (no piece within `piece_s`) or dripped past the deadline for all of it."""
    if whole:
        message = f"The request body did not arrive whole within {whole_s:g} s."
    else:
        message = f"The request body did not arrive within {piece_s:g} s."
    return HTTPException(408, message, headers={"connection": "close"})
