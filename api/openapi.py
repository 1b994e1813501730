"""The OpenAPI document: FastAPI's, with OpenAI's error statuses in place of FastAPI's 422 and the upload form."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from shared.schemas import UPLOAD_PURPOSES, ErrorResponse

ERROR_STATUSES = {
    "400": "Invalid request",
    "401": "Missing or wrong API key",
    "403": "Not allowed for this API key",
    "404": "No such object for this caller",
    "409": "Conflicts with the object's state",
    "408": "The request body arrived too slowly",
    "413": "Request body too large",
    "503": "Storage unavailable: retry after the Retry-After header's seconds",
}

UPLOAD_FORM = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                },
            }
        }
    },
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in components["ErrorResponse"].pop("$defs", {}).items():
            components.setdefault(name, sub)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in ERROR_STATUSES.items():
                    responses.setdefault(status, {"description": description, **error})
                if method == "post" and path.endswith("/files"):
                    operation["requestBody"] = UPLOAD_FORM
                if path.endswith("/content") or path.endswith("/output"):
                    responses["200"] = {"description": "The file's bytes",
                                        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                            "format": "binary"}}}}
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
