"""Request dependencies: settings, stores and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import authenticate
from shared.async_store import AsyncBatchReader
from shared.blobs import BlobStore
from shared.errors import InvalidRequest
from shared.providers import ProviderRegistry
from shared.scope import Principal
from shared.settings import Settings
from shared.store import Store

MAX_END_USER_CHARS = 256


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_batch_reader(request: Request) -> AsyncBatchReader:
    return request.app.state.batch_reader


async def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


async def get_providers(request: Request) -> ProviderRegistry:
    return request.app.state.providers


async def get_principal(request: Request) -> Principal:
    tenant = authenticate(request.app.state.keyring, request.headers)
    end_user = request.headers.get("x-on-behalf-of")
    if end_user is not None:
        end_user = end_user.strip()
        if not end_user or len(end_user) > MAX_END_USER_CHARS or not end_user.isprintable():
            raise InvalidRequest(
                f"Invalid 'X-On-Behalf-Of' header: must be 1 to {MAX_END_USER_CHARS} printable characters.",
                param="X-On-Behalf-Of",
            )
    return Principal(tenant, end_user)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
BatchReaderDep = Annotated[AsyncBatchReader, Depends(get_batch_reader)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
ProvidersDep = Annotated[ProviderRegistry, Depends(get_providers)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
