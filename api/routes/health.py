from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from api.auth import check_metrics_access
from api.deps import BatchReaderDep, SettingsDep

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz(reader: BatchReaderDep) -> dict:
    await reader.ping()  # Redis unreachable: 503 storage_unavailable with Retry-After (api/errors.py)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz() -> dict:
    """Readiness: the process serves HTTP. It does not ask Redis, so during a Redis failover the pods stay in their
    Service and clients get 503 with Retry-After (which the SDKs retry) rather than refused connections; /healthz
    reports Redis."""
    return {"status": "ok"}


@router.get("/metrics")
def prometheus_metrics(request: Request, settings: SettingsDep) -> Response:
    check_metrics_access(settings, request.headers)
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
