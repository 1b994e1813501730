"""OpenAI-style errors raised by the service layer and rendered by the API as the error envelope."""

from __future__ import annotations


class APIError(Exception):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status_code = 400


class AuthenticationFailed(APIError):
    status_code = 401

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(message, code=code)


class PermissionDenied(APIError):
    status_code = 403


class NotFound(APIError):
    status_code = 404


class Conflict(APIError):
    status_code = 409

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, headers={"x-should-retry": "false"}, **kwargs)


class PayloadTooLarge(APIError):
    status_code = 413


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "server_error"


def missing_parameter(name: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")


def invalid_parameter(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=name, code="invalid_value")
