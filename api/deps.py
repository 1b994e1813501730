"""Request dependencies: settings, stores and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import authenticate, end_user_of
from shared.store_async import AsyncBatchReader
from shared.blobs import BlobStore
from shared.providers import ProviderRegistry
from shared.scope import Principal
from shared.settings import Settings
from shared.store import Store


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
    return Principal(tenant, end_user_of(request.headers))


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
BatchReaderDep = Annotated[AsyncBatchReader, Depends(get_batch_reader)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
ProvidersDep = Annotated[ProviderRegistry, Depends(get_providers)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
