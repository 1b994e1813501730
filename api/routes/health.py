from __future__ import annotations

from fastapi import APIRouter

from api.deps import StoreDep
from shared.errors import ServiceUnavailable

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
def healthz(store: StoreDep) -> dict:
    try:
        store.r.ping()
    except Exception:  # noqa: BLE001
        raise ServiceUnavailable("Redis is not reachable.") from None
    return {"status": "ok"}
