"""Batches as the API sees them: create, retrieve, list and cancel, each scoped to its owner."""

from __future__ import annotations

import time
from typing import Any

from shared import events, forwarding
from shared.store_async import AsyncBatchReader
from shared.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    invalid_parameter,
    missing_parameter,
)
from shared.ids import new_batch_id
from shared.lifecycle import NO_OP, VALIDATING, BatchRecord, BatchSpec, BatchState, Lifecycle
from shared.providers import ProviderRegistry
from shared.schemas import SUPPORTED_ENDPOINTS, Batch, ListPage
from shared.scope import Principal
from shared.settings import Settings
from shared.store import Store

BATCHES_LIST_MAX = 100
BATCHES_LIST_DEFAULT = 20
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
PRIORITY_LIMIT = 1_000_000


def validate_priority(priority: Any) -> int:
    if priority is None:
        return 0
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > PRIORITY_LIMIT:
        raise invalid_parameter("priority", f"Invalid 'priority': expected an integer between -{PRIORITY_LIMIT} "
                                f"and {PRIORITY_LIMIT} (higher runs first among your batches).")
    return priority


def validate_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise invalid_parameter("metadata", "Invalid 'metadata': expected an object of string keys and values.")
    if len(metadata) > METADATA_MAX_PAIRS:
        raise invalid_parameter(
            "metadata", f"Invalid 'metadata': too many keys ({len(metadata)}); at most {METADATA_MAX_PAIRS} are allowed."
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise invalid_parameter("metadata", f"Invalid 'metadata': the value of '{key[:64]}' must be a string.")
        if len(key) > METADATA_MAX_KEY:
            raise invalid_parameter(
                "metadata", f"Invalid 'metadata': key '{key[:64]}…' is longer than {METADATA_MAX_KEY} characters."
            )
        if len(value) > METADATA_MAX_VALUE:
            raise invalid_parameter(
                "metadata", f"Invalid 'metadata': the value of '{key}' is longer than {METADATA_MAX_VALUE} characters."
            )
    return metadata


def validate_output_expires_after(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise invalid_parameter(
            "output_expires_after", "Invalid 'output_expires_after': expected {\"anchor\": \"created_at\", \"seconds\": N}."
        )
    seconds = value.get("seconds")
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 3600 <= seconds <= 2_592_000:
        raise invalid_parameter(
            "output_expires_after.seconds",
            "Invalid 'output_expires_after.seconds': must be an integer between 3600 and 2592000.",
        )
    return seconds


def check_provider(registry: ProviderRegistry, tenant: str, name: str | None) -> str | None:
    """The provider a request names in a header, if it may use it."""
    if name is None:
        return None
    if registry.get(name) is None:
        raise InvalidRequest(f"Unknown provider '{name[:64]}'.", param="provider", code="unknown_provider")
    if not registry.allowed(tenant, name):
        raise PermissionDenied(f"This API key may not use the provider '{name}'.", param="provider",
                               code="provider_not_allowed")
    return name


def create_batch(
    store: Store,
    settings: Settings,
    principal: Principal,
    body: Any,
    *,
    default_window: str | None = None,
    window_aliases: tuple[str, ...] = (),
    provider: str | None = None,
    native: bool = False,
    retry_of: str | None = None,
) -> Batch:
    """`native`: the provider named by header forwards whole batches to its own Batch API (shared/forwarding.py).
    `retry_of`: the batch whose failed lines this one retries (shared/retry_service.py)."""
    scope = principal.scope
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    input_file_id = body.get("input_file_id")
    endpoint = body.get("endpoint")
    window = body.get("completion_window", default_window)
    if input_file_id in (None, ""):
        raise missing_parameter("input_file_id")
    if not isinstance(input_file_id, str):
        raise invalid_parameter("input_file_id", "Invalid 'input_file_id': expected a string.")
    if endpoint in (None, ""):
        raise missing_parameter("endpoint")
    if endpoint not in SUPPORTED_ENDPOINTS:
        raise InvalidRequest(
            f"Invalid 'endpoint': {str(endpoint)[:200]!r} is not supported. "
            f"Supported endpoints: {', '.join(SUPPORTED_ENDPOINTS)}.",
            param="endpoint",
            code="unsupported_endpoint",
        )
    if window in (None, ""):
        raise missing_parameter("completion_window")
    if window in window_aliases:
        window = "24h"
    windows = settings.window_seconds()
    if not isinstance(window, str) or window not in windows:
        supported = ", ".join(f"'{name}'" for name in windows)
        raise invalid_parameter("completion_window",
                                f"Invalid 'completion_window': {str(window)[:64]!r}. Supported: {supported}.")
    if native and forwarding.window_too_short(settings, window):
        raise InvalidRequest(forwarding.window_message(window, provider or ""), param="completion_window",
                             code=forwarding.WINDOW_TOO_SHORT)
    priority = validate_priority(body.get("priority"))
    metadata = validate_metadata(body.get("metadata"))
    output_ttl = validate_output_expires_after(body.get("output_expires_after"))

    record = store.get_file(input_file_id)
    if record is None or record.scope != scope:
        raise NotFound(f"No such File object: {input_file_id}", param="input_file_id", code="file_not_found")
    if record.file.purpose != "batch":
        raise InvalidRequest(
            f"File {input_file_id} has purpose '{record.file.purpose}'; a batch needs a file uploaded with purpose 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )

    now = int(time.time())
    spec = BatchSpec(
        id=new_batch_id(),
        tenant=principal.tenant,
        scope=scope,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=window,
        created_at=now,
        expires_at=now + windows[window],
        metadata=metadata,
        output_ttl_s=output_ttl,
        priority=priority,
        retry_of=retry_of,
    )
    store.put_batch(spec, provider)
    events.created(spec, record.file.filename, record.file.bytes, provider)
    batch = BatchRecord(spec, BatchState(status=VALIDATING, updated_at=now)).to_batch(0, 0)
    return batch


def found(batch: Batch | None, batch_id: str) -> Batch:
    """The batch, or the 404 an unknown id and another scope's id alike answer."""
    if batch is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="id", code="batch_not_found")
    return batch


def get_batch(store: Store, scope: str, batch_id: str) -> Batch:
    return found(store.get_batches([batch_id], scope)[0], batch_id)


async def read_batch(reader: AsyncBatchReader, scope: str, batch_id: str) -> Batch:
    return found(await reader.get_batch(batch_id, scope), batch_id)


def list_limit(limit: int | None) -> int:
    limit = BATCHES_LIST_DEFAULT if limit is None else limit
    if not 1 <= limit <= BATCHES_LIST_MAX:
        raise invalid_parameter("limit", f"Invalid 'limit': must be between 1 and {BATCHES_LIST_MAX}.")
    return limit


async def list_batches(reader: AsyncBatchReader, scope: str, *, limit: int | None, after: str | None
                       ) -> ListPage[Batch]:
    page = await reader.list_batch_ids(scope, list_limit(limit), after)
    batches = [b for b in await reader.get_batches(page.ids, scope) if b is not None]
    return ListPage[Batch](
        data=batches,
        first_id=batches[0].id if batches else None,
        last_id=batches[-1].id if batches else None,
        has_more=page.has_more,
    )


def cancel_batch(store: Store, scope: str, batch_id: str) -> Batch:
    get_batch(store, scope, batch_id)
    # A cancel is never a terminal move, so the lifecycle needs none of the terminal side effects' settings here.
    outcome = Lifecycle(store, cleanup_delay_s=0).cancel(batch_id, time.time())
    if not outcome.moved and outcome.status not in NO_OP["cancel"]:
        raise Conflict(f"Cannot cancel a batch with status '{outcome.status}'.")
    return get_batch(store, scope, batch_id)
