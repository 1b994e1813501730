"""The HTTP front door: an OpenAI-compatible Files and Batches API."""

from __future__ import annotations

import gc
import logging
import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from api import errors
from api.auth import PLACEHOLDER_MESSAGE, KeyRing, uses_placeholder_key
from api.limits import RequestLimitsMiddleware
from api.metrics import make_registry
from api.openapi import install_openapi
from api.request_id import RequestIdMiddleware
from api.routes import admin, batches, files, health, ui
from shared.store_async import AsyncBatchReader
from shared.blobs import make_blob_store
from shared.logs import configure_logging
from shared.providers import ProviderRegistry
from shared.settings import DEV_API_KEY, Settings, get_settings
from shared.store import Store

log = logging.getLogger("batchgate.api")

MULTIPART_OVERHEAD = 1024 * 1024
STARTUP_FAILURE = 3  # uvicorn.config.STARTUP_FAILURE


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Everything built so far lives as long as the process; keeping it out of the collector's generations
    # spares each full collection from walking it (tens of ms otherwise, seen as the API's p99).
    gc.freeze()
    yield
    await app.state.batch_reader.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if uses_placeholder_key(settings):
        # Printed, not logged: the log filter would mask the key the message names. 3 is uvicorn's "startup
        # failure": with --workers N its supervisor stops too, instead of starting the worker again.
        print(PLACEHOLDER_MESSAGE, file=sys.stderr, flush=True)
        raise SystemExit(STARTUP_FAILURE)
    configure_logging(settings)
    app = FastAPI(
        lifespan=_lifespan,
        title="batchgate",
        version="0.1.0",
        description="A self-hosted, OpenAI-compatible Batch API.",
    )
    app.state.settings = settings
    # Bounded waits, so a frozen Redis costs a request `redis_timeout_s`, then a 503 (api/errors.py).
    app.state.store = Store.from_settings(settings, timeout_s=settings.redis_timeout_s, quick_retry=True)
    app.state.batch_reader = AsyncBatchReader.from_settings(settings, timeout_s=settings.redis_timeout_s,
                                                            quick_retry=True)
    app.state.blobs = make_blob_store(settings)
    app.state.keyring = KeyRing.from_settings(settings)
    app.state.providers = ProviderRegistry.from_settings(settings)
    app.state.metrics_registry = make_registry(app.state.store, app.state.providers)
    if settings.dev_mode and not settings.api_keys:
        # Printed rather than logged: the log filter masks anything shaped like a key, and this one is public.
        print(f"development mode: accepting the API key {DEV_API_KEY}", file=sys.stderr, flush=True)

    errors.install(app)
    install_openapi(app)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(ui.router)
    # One implementation, mounted once per dialect: OpenAI, Portkey, AlphaEdge, mka1. OpenAI's batch routes come
    # first: they are what clients poll, and routes are matched in order.
    app.include_router(batches.router, prefix="/v1")
    app.include_router(batches.output_router, prefix="/v1")
    for prefix in ("/v1", "", "/api/v1/llm"):
        app.include_router(files.router, prefix=prefix)
    app.include_router(batches.router, prefix="")
    app.include_router(batches.output_router, prefix="")
    app.include_router(batches.singular_router, prefix="/v1")
    app.include_router(batches.router, prefix="/api/v1/llm")
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD,
                       body_read_timeout_s=settings.body_read_timeout_s, body_deadline_s=settings.upload_deadline_s)
    app.add_middleware(RequestIdMiddleware)
    return app


def __getattr__(name: str):
    # `uvicorn api.main:app` builds the app on first access, after the environment is final.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
