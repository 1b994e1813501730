"""The Idempotency-Key header on the routes that write (files.create, batches.create, batches.cancel)."""

from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from shared import idempotency
from shared.scope import Principal
from shared.settings import Settings
from shared.store import Store

HEADER = "idempotency-key"

# The header in the OpenAPI schema of the routes that take it.
OPENAPI_HEADER = {"parameters": [{
    "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255},
    "description": "The same request with the same key within 24 h gets the first answer again without doing the "
                   "work twice; another request with the key is a 409 idempotency_key_reused.",
}]}


async def respond_once(request: Request, principal: Principal, store: Store, settings: Settings,
                       parts: Callable[[], Awaitable[list[bytes | str]]],
                       produce: Callable[[], Awaitable[BaseModel]]) -> Response:
    """`produce`'s object as the response; with an Idempotency-Key, only once per key and request (`parts` says
    what the request is)."""
    values = request.headers.getlist(HEADER)
    if not values:
        return Response((await produce()).model_dump_json(), media_type="application/json")
    key = idempotency.check_key(values)

    async def answer() -> idempotency.Answer:
        return idempotency.Answer(200, (await produce()).model_dump_json().encode())

    fp = idempotency.fingerprint(request.url.path.rsplit("/v1", 1)[-1], *(await parts()))
    got = await idempotency.once(store, principal.scope, key, fp, answer, ttl_s=settings.idempotency_ttl_s,
                                 wait_s=settings.idempotency_wait_s, call=run_in_threadpool)
    headers = {"idempotent-replayed": "true"} if got.replayed else {}
    return Response(got.body, status_code=got.status, media_type="application/json", headers=headers)
