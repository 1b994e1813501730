"""API keys: which tenant a credential belongs to. Keys are kept and compared as SHA-256 digests."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from shared.errors import AuthenticationFailed, InvalidRequest
from shared.settings import DEV_API_KEY, DEV_TENANT, Settings

CREDENTIAL_HEADERS = ("x-portkey-api-key", "x-api-key")
MAX_END_USER_CHARS = 256


# docker-compose.yml's default key: anyone reading it knows it, so the API refuses it outside dev mode.
PLACEHOLDER_KEY = "sk-change-me"
PLACEHOLDER_MESSAGE = (
    f"batchgate: refusing to start: BATCHGATE_API_KEYS holds the placeholder key {PLACEHOLDER_KEY}, "
    "docker-compose.yml's default, which anyone can read. Set your own keys, as comma-separated key=tenant "
    "pairs, e.g. in a .env file next to docker-compose.yml: BATCHGATE_API_KEYS=<a long random key>=default "
    "(`openssl rand -hex 32` makes one), then `docker compose up -d` again. To try batchgate with the placeholder "
    "anyway, set BATCHGATE_DEV_MODE=1."
)


def uses_placeholder_key(settings: Settings) -> bool:
    keys = (pair.strip().rpartition("=")[0] for pair in settings.api_keys.split(","))
    return not settings.dev_mode and PLACEHOLDER_KEY in keys


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


def presented_key(headers) -> tuple[str, str] | None:
    """The batchgate credential and the header it came in.

    `x-portkey-api-key` or `x-api-key`, when sent, IS the credential, and Authorization is not used to
    authenticate: in Portkey's model (the OpenAI SDK with Portkey's headers) Authorization carries the provider's
    key, since the SDK always sends one. It is never logged or echoed. Otherwise the credential is
    `Authorization: Bearer`.
    """
    bearer = bearer_token(headers)  # also rejects a second Authorization header, whichever credential counts
    carried = {name: (single_header(headers, name) or "").strip(" \t") for name in CREDENTIAL_HEADERS}
    carried = {name: value for name, value in carried.items() if value}
    if len(set(carried.values())) > 1:
        raise InvalidRequest("The x-portkey-api-key and x-api-key headers carry different keys; send one key.",
                             param="x-api-key", code="conflicting_credentials")
    if carried:
        name, value = next(iter(carried.items()))
        return value, name
    return (bearer, "authorization") if bearer else None


def authenticate(keyring: KeyRing, headers) -> str:
    presented = presented_key(headers)
    if presented is None:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' (or in 'x-portkey-api-key' "
            "or 'x-api-key').", code="missing_api_key"
        )
    key, header = presented
    tenant = keyring.tenant_for(key)
    if tenant is None:
        shown = f"{key[:3]}****{key[-4:]}" if len(key) > 8 else "****"
        where = "" if header == "authorization" else f" in the '{header}' header"
        raise AuthenticationFailed(f"Incorrect API key provided{where}: {shown}.")
    return tenant


def end_user_of(headers) -> str | None:
    """The end user named in `X-On-Behalf-Of`, exactly as sent apart from surrounding ASCII spaces and tabs.

    The value scopes files and batches, so two spellings must never name one user: a value with a control
    character, a non-ASCII space (`alice\\xa0`), or any other character `str.isprintable` refuses is a 400, not
    trimmed into someone else's name.
    """
    end_user = single_header(headers, "x-on-behalf-of")
    if end_user is None:
        return None
    end_user = end_user.strip(" \t")
    if not end_user or len(end_user) > MAX_END_USER_CHARS or not end_user.isprintable():
        raise InvalidRequest(
            f"Invalid 'X-On-Behalf-Of' header: must be 1 to {MAX_END_USER_CHARS} printable characters, without "
            "control characters or non-ASCII spaces.",
            param="X-On-Behalf-Of",
            code="invalid_end_user",
        )
    return end_user


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
