"""Operator routes, behind BATCHGATE_ADMIN_API_KEY (tenant keys never reach them)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request

from api.deps import ProvidersDep, SettingsDep, StoreDep
from api.metrics import provider_limits
from shared.errors import AuthenticationFailed

router = APIRouter(prefix="/admin", tags=["admin"])


def require_admin(request: Request, settings) -> None:
    expected = settings.admin_api_key.get_secret_value() if settings.admin_api_key else ""
    presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise AuthenticationFailed("This route needs the operator's admin API key.")


@router.get("/usage")
def usage(request: Request, store: StoreDep, settings: SettingsDep) -> dict:
    """Token and request totals per tenant, over every batch that has ended; with [prices] in the providers file,
    also `cost` {currency: amount} and `cost_by_day` {UTC day of the batches' end: {currency: amount}}."""
    require_admin(request, settings)
    return {"object": "usage", "tenants": store.tenant_usage()}


@router.get("/providers")
def providers(request: Request, store: StoreDep, settings: SettingsDep, registry: ProvidersDep) -> dict:
    """Every provider's limits: configured, in flight now, and the current adaptive limit (never shown to tenants)."""
    require_admin(request, settings)
    return {"object": "list", "data": [provider_limits(store, p) for p in registry.providers.values()]}
