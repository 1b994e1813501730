"""Every failure leaves the API as OpenAI's error envelope, with the request id in a header."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from shared.errors import APIError
from shared.store_client import STORAGE_UNAVAILABLE

log = logging.getLogger("batchgate.api")

_HTTP_CODES = {
    401: ("invalid_api_key", "invalid_request_error"),
    404: ("unknown_url", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    408: ("request_timeout", "invalid_request_error"),
    413: ("request_too_large", "invalid_request_error"),
}


def envelope(status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None,
             headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code, type_ = _HTTP_CODES.get(exc.status_code, (None, "invalid_request_error"))
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    elif exc.status_code == 413:
        message = "The request body is larger than this server accepts."
    else:
        message = str(exc.detail)
    return envelope(exc.status_code, message, type_=type_, code=code, headers=getattr(exc, "headers", None))


def storage_unavailable(request_id: str, retry_after_s: int) -> JSONResponse:
    return envelope(
        503,
        f"The service's storage is unavailable right now; retry in a few seconds. Request id: {request_id}.",
        type_="server_error",
        code="storage_unavailable",
        headers={"retry-after": str(retry_after_s)},
    )


async def storage_error_handler(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.scope.get("request_id", "")
    log.warning("storage unavailable on %s %s (request %s): %s: %s", request.method, request.url.path, request_id,
                type(exc).__name__, exc)
    return storage_unavailable(request_id, request.app.state.settings.storage_retry_after_s)


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = _param_of(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param:
        return envelope(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    detail = first.get("msg", "Invalid request.")
    message = f"Invalid '{param}': {detail}." if param else f"Invalid request: {detail}."
    return envelope(400, message, param=param, code="invalid_value")


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.scope.get("request_id", "")
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
    return envelope(
        500,
        f"The server had an error while processing your request. Request id: {request_id}.",
        type_="server_error",
        headers={"x-request-id": request_id},
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    for exc_class in STORAGE_UNAVAILABLE:
        app.add_exception_handler(exc_class, storage_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
