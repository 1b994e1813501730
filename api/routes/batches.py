from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SettingsDep, StoreDep
from shared import batch_service
from shared.errors import InvalidRequest
from shared.queue import enqueue_orchestrate
from shared.schemas import Batch, BatchCreateRequest, ListPage

router = APIRouter(tags=["batches"])


async def _json_body(request: Request) -> object:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send a JSON object.", code="invalid_json"
        ) from None


@router.post(
    "/batches",
    response_model=Batch,
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": BatchCreateRequest.model_json_schema()}}}},
)
async def create_batch(request: Request, principal: PrincipalDep, store: StoreDep, settings: SettingsDep) -> Batch:
    body = await _json_body(request)
    batch = await run_in_threadpool(
        batch_service.create_batch,
        store,
        settings,
        principal.scope,
        body,
        provider=request.headers.get("x-batchgate-provider"),
    )
    await run_in_threadpool(enqueue_orchestrate, batch.id)
    return batch


@router.get("/batches", response_model=ListPage[Batch])
def list_batches(
    principal: PrincipalDep, store: StoreDep, limit: int | None = None, after: str | None = None
) -> ListPage[Batch]:
    return batch_service.list_batches(store, principal.scope, limit=limit, after=after)


@router.get("/batches/{batch_id}", response_model=Batch)
def retrieve_batch(batch_id: str, principal: PrincipalDep, store: StoreDep) -> Batch:
    return batch_service.get_batch(store, principal.scope, batch_id)


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
def cancel_batch(batch_id: str, principal: PrincipalDep, store: StoreDep) -> Batch:
    return batch_service.cancel_batch(store, principal.scope, batch_id)
