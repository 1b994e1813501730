from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from api.deps import BatchReaderDep
from shared.errors import ServiceUnavailable

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz(reader: BatchReaderDep) -> dict:
    try:
        await reader.ping()
    except Exception:  # noqa: BLE001
        raise ServiceUnavailable("Redis is not reachable.") from None
    return {"status": "ok"}


@router.get("/metrics")
def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
