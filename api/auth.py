"""API keys: which tenant a credential belongs to. Keys are kept and compared as SHA-256 digests."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from shared.errors import AuthenticationFailed, InvalidRequest
from shared.settings import DEV_API_KEY, DEV_TENANT, Settings

CREDENTIAL_HEADERS = ("x-portkey-api-key", "x-api-key")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyRing:
    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> "KeyRing":
        entries: list[tuple[bytes, str]] = []
        for pair in settings.api_keys.split(","):
            pair = pair.strip()
            if not pair:
                continue
            key, sep, tenant = pair.rpartition("=")
            if not sep or not key or not tenant:
                raise ValueError("BATCHGATE_API_KEYS must be comma-separated key=tenant pairs")
            if key.startswith("sha256:"):
                entries.append((bytes.fromhex(key.removeprefix("sha256:")), tenant))
            else:
                entries.append((digest(key), tenant))
        if not entries and settings.dev_mode:
            entries.append((digest(DEV_API_KEY), DEV_TENANT))
        return cls(tuple(entries))

    def tenant_for(self, presented: str) -> str | None:
        wanted = digest(presented)
        found = None
        for stored, tenant in self.entries:
            if hmac.compare_digest(stored, wanted):
                found = tenant
        return found


def presented_key(headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        if value:
            return value.strip()
    return None


def authenticate(keyring: KeyRing, headers) -> str:
    key = presented_key(headers)
    if key is None:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key"
        )
    tenant = keyring.tenant_for(key)
    if tenant is None:
        shown = f"{key[:3]}****{key[-4:]}" if len(key) > 8 else "****"
        raise AuthenticationFailed(f"Incorrect API key provided: {shown}.")
    return tenant


def single_header(headers, name: str) -> str | None:
    """The one value of header `name`, or None. Sent twice it is a 400: which copy counts must not depend on the
    server (Starlette's `headers.get` would take the first, a proxy in front might take the last)."""
    values = headers.getlist(name)
    if len(values) > 1:
        raise InvalidRequest(f"The '{name}' header was sent {len(values)} times; send it once.", param=name,
                             code="duplicate_header")
    return values[0] if values else None


def bearer_token(headers) -> str | None:
    authorization = single_header(headers, "authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def metrics_open(settings: Settings) -> bool:
    """Without any API keys in development mode, /metrics needs no credential, like the rest of the API."""
    return settings.dev_mode and not settings.api_keys.strip()


def check_metrics_access(settings: Settings, headers) -> None:
    """/metrics shows every tenant's figures: it needs the admin key or the metrics token, unless `metrics_open`."""
    if metrics_open(settings):
        return
    accepted = [secret.get_secret_value() for secret in (settings.admin_api_key, settings.metrics_token) if secret]
    presented = bearer_token(headers)
    if presented is None or not any(hmac.compare_digest(presented.encode(), key.encode()) for key in accepted):
        raise AuthenticationFailed(
            "The metrics need the operator's admin API key or the metrics token (BATCHGATE_METRICS_TOKEN), sent as "
            "'Authorization: Bearer TOKEN'."
        )
