from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from api.deps import BatchReaderDep, BlobsDep, PrincipalDep, ProvidersDep, SettingsDep, StoreDep
from shared import batch_service, file_service
from shared.errors import InvalidRequest, NotFound
from shared.queue import enqueue_orchestrate
from shared.schemas import Batch, BatchCreateRequest, ListPage

# Portkey's managed batching calls the default window "immediate".
WINDOW_ALIASES = ("immediate",)


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


def model_response(model: BaseModel) -> Response:
    """A model built and validated by the service, serialized once: the routes clients poll skip FastAPI's second
    validation of their response. `response_model` still documents them."""
    return Response(model.model_dump_json(), media_type="application/json")


def requested_provider(request: Request) -> str | None:
    """A provider named by header: batchgate's own, or Portkey's virtual key or `@slug` provider."""
    headers = request.headers
    if name := headers.get("x-batchgate-provider") or headers.get("x-portkey-virtual-key"):
        return name.strip()
    if slug := headers.get("x-portkey-provider"):
        return slug.strip().removeprefix("@")
    return None


def batches_router(collection: str = "batches", *, default_window: str | None = None,
                   with_output: bool = False) -> APIRouter:
    """The Batches routes under `/{collection}`; each vendor dialect mounts one with its own defaults."""
    router = APIRouter(tags=["batches"])

    @router.post(
        f"/{collection}",
        response_model=Batch,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": BatchCreateRequest.model_json_schema()}}}},
    )
    async def create_batch(request: Request, principal: PrincipalDep, store: StoreDep, settings: SettingsDep,
                           providers: ProvidersDep) -> Batch:
        body = await _json_body(request)
        provider = batch_service.check_provider(providers, principal.tenant, requested_provider(request))
        batch = await run_in_threadpool(
            batch_service.create_batch, store, settings, principal, body,
            default_window=default_window, window_aliases=WINDOW_ALIASES, provider=provider,
        )
        await run_in_threadpool(enqueue_orchestrate, batch.id)
        return batch

    @router.get(f"/{collection}", response_model=ListPage[Batch])
    async def list_batches(principal: PrincipalDep, reader: BatchReaderDep, limit: int | None = None,
                           after: str | None = None) -> Response:
        return model_response(await batch_service.list_batches(reader, principal.scope, limit=limit, after=after))

    @router.get(f"/{collection}/{{batch_id}}", response_model=Batch)
    async def retrieve_batch(batch_id: str, principal: PrincipalDep, reader: BatchReaderDep) -> Response:
        return model_response(await batch_service.read_batch(reader, principal.scope, batch_id))

    @router.post(f"/{collection}/{{batch_id}}/cancel", response_model=Batch)
    def cancel_batch(batch_id: str, principal: PrincipalDep, store: StoreDep) -> Batch:
        return batch_service.cancel_batch(store, principal.scope, batch_id)

    if with_output:
        @router.get(f"/{collection}/{{batch_id}}/output", response_class=StreamingResponse)
        def batch_output(batch_id: str, principal: PrincipalDep, store: StoreDep, blobs: BlobsDep) -> StreamingResponse:
            """Portkey's shortcut to a finished batch's output file."""
            batch = batch_service.get_batch(store, principal.scope, batch_id)
            if batch.output_file_id is None:
                raise NotFound(f"Batch {batch_id} has no output file (status '{batch.status}').",
                               param="id", code="output_not_ready")
            record, stream = file_service.file_content(store, blobs, principal.scope, batch.output_file_id)
            return StreamingResponse(stream, media_type="application/octet-stream",
                                     headers={"content-length": str(record.file.bytes)})

    return router
