from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from api.idempotency import OPENAPI_HEADER, respond_once
from api.deps import BatchReaderDep, BlobsDep, PrincipalDep, ProvidersDep, SettingsDep, StoreDep
from shared import batch_service, file_service, progress, results, retry_service
from shared.errors import InvalidRequest, NotFound
from shared.providers import ProviderRegistry
from shared.queue import enqueue_forward, enqueue_orchestrate
from shared.schemas import (Batch, BatchCreateRequest, BatchProgress, BatchRetryRequest, ListPage, RequestStatus,
                            ResultsPage)
from shared.scope import Principal
from shared.settings import Settings
from shared.store import Store

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


CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": BatchCreateRequest.model_json_schema()}}}, **OPENAPI_HEADER}

# The Batches routes, one implementation included under each dialect's prefix (api/main.py):
# `router` is /batches (OpenAI, Portkey, mka1); `output_router` adds Portkey's /batches/{id}/output shortcut;
# `singular_router` is AlphaEdge's /batch, where completion_window is optional (default 24h).
router = APIRouter(tags=["batches"])
output_router = APIRouter(tags=["batches"])
singular_router = APIRouter(tags=["batches"])


async def _create(request: Request, principal: Principal, store: Store, settings: Settings,
                  providers: ProviderRegistry, *, default_window: str | None) -> Response:
    """Create a batch (a window left out defaults to `default_window`) and hand it to the workers; once per
    Idempotency-Key."""

    async def create() -> Batch:
        body = await _json_body(request)
        provider = batch_service.check_provider(providers, principal.tenant, requested_provider(request))
        native = provider is not None and providers.providers[provider].batch_api == "native"
        batch = await run_in_threadpool(
            batch_service.create_batch, store, settings, principal, body,
            default_window=default_window, window_aliases=WINDOW_ALIASES, provider=provider, native=native,
        )
        await run_in_threadpool(enqueue_orchestrate, batch.id)
        return batch

    async def request_parts() -> list[bytes | str]:
        return [await request.body(), requested_provider(request) or "", default_window or ""]

    return await respond_once(request, principal, store, settings, request_parts, create)


@router.post("/batches", response_model=Batch, openapi_extra=CREATE_BODY)
async def create_batch(request: Request, principal: PrincipalDep, store: StoreDep, settings: SettingsDep,
                       providers: ProvidersDep) -> Batch:
    return await _create(request, principal, store, settings, providers, default_window=None)


@singular_router.post("/batch", response_model=Batch, openapi_extra=CREATE_BODY, name="create_batch")
async def create_batch_default_window(request: Request, principal: PrincipalDep, store: StoreDep,
                                      settings: SettingsDep, providers: ProvidersDep) -> Batch:
    return await _create(request, principal, store, settings, providers, default_window="24h")


@router.get("/batches", response_model=ListPage[Batch])
@singular_router.get("/batch", response_model=ListPage[Batch])
async def list_batches(principal: PrincipalDep, reader: BatchReaderDep, limit: int | None = None,
                       after: str | None = None) -> Response:
    return model_response(await batch_service.list_batches(reader, principal.scope, limit=limit, after=after))


@router.get("/batches/{batch_id}", response_model=Batch)
@singular_router.get("/batch/{batch_id}", response_model=Batch)
async def retrieve_batch(batch_id: str, principal: PrincipalDep, reader: BatchReaderDep) -> Response:
    return model_response(await batch_service.read_batch(reader, principal.scope, batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=Batch, openapi_extra=OPENAPI_HEADER)
@singular_router.post("/batch/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(batch_id: str, request: Request, principal: PrincipalDep, store: StoreDep,
                       settings: SettingsDep) -> Response:
    async def cancel() -> Batch:
        batch = await run_in_threadpool(batch_service.cancel_batch, store, principal.scope, batch_id)
        if batch.provider_batch_id is not None and batch.status == "cancelling":
            # Forwarded: the provider's batch is cancelled now, not at the next poll.
            await run_in_threadpool(enqueue_forward, batch_id)
        return batch

    async def request_parts() -> list[bytes | str]:
        return [batch_id]

    return await respond_once(request, principal, store, settings, request_parts, cancel)


RETRY_BODY = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": BatchRetryRequest.model_json_schema()}}}}


@router.post("/batches/{batch_id}/retry", response_model=Batch, openapi_extra=RETRY_BODY)
@singular_router.post("/batch/{batch_id}/retry", response_model=Batch, openapi_extra=RETRY_BODY)
async def retry_batch(batch_id: str, request: Request, principal: PrincipalDep, store: StoreDep, blobs: BlobsDep,
                      settings: SettingsDep, providers: ProvidersDep) -> Response:
    """A batchgate extension: a new batch of a finished batch's failed lines (all, or those with one of `codes`),
    with `retry_of` on it and its id in the old batch's `retried_by`; once per Idempotency-Key."""

    async def retry() -> Batch:
        body = await _json_body(request)
        batch = await run_in_threadpool(retry_service.retry_batch, store, blobs, settings, providers, principal,
                                        batch_id, body)
        await run_in_threadpool(enqueue_orchestrate, batch.id)
        return batch

    async def request_parts() -> list[bytes | str]:
        return [batch_id, await request.body()]

    return await respond_once(request, principal, store, settings, request_parts, retry)


@router.get("/batches/{batch_id}/progress", response_model=BatchProgress)
def batch_progress(batch_id: str, principal: PrincipalDep, store: StoreDep) -> BatchProgress:
    """A batchgate extension: the batch's completed and failed counts over time, its rate and time left."""
    return progress.batch_progress(store, principal.scope, batch_id)


@output_router.get("/batches/{batch_id}/output", response_class=StreamingResponse)
def batch_output(batch_id: str, principal: PrincipalDep, store: StoreDep, blobs: BlobsDep) -> StreamingResponse:
    """Portkey's shortcut to a finished batch's output file."""
    batch = batch_service.get_batch(store, principal.scope, batch_id)
    if batch.output_file_id is None:
        raise NotFound(f"Batch {batch_id} has no output file (status '{batch.status}').",
                       param="id", code="output_not_ready")
    record, stream = file_service.file_content(store, blobs, principal.scope, batch.output_file_id)
    return StreamingResponse(stream, media_type="application/octet-stream",
                             headers={"content-length": str(record.file.bytes)})


# ---- results while a batch runs, and one request's status (batchgate extensions; shared/results.py) ---------------


@router.get("/batches/{batch_id}/results", response_model=ResultsPage)
def batch_results(batch_id: str, principal: PrincipalDep, store: StoreDep, blobs: BlobsDep, after: str | None = None,
                  limit: int | None = None) -> Response:
    """The lines finished so far, output and error lines in one stream; `after=<next_cursor>` continues."""
    return Response(results.results_page(store, blobs, principal.scope, batch_id, after, limit),
                    media_type="application/json")


@router.get("/batches/{batch_id}/requests/{custom_id:path}", response_model=RequestStatus)
def batch_request_status(batch_id: str, custom_id: str, principal: PrincipalDep, store: StoreDep,
                         blobs: BlobsDep) -> Response:
    """Where one request of the batch stands, with its result line once it has finished."""
    return Response(results.request_status(store, blobs, principal.scope, batch_id, custom_id),
                    media_type="application/json")
