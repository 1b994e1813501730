from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import Response, StreamingResponse

from api.idempotency import OPENAPI_HEADER, respond_once
from api.deps import BlobsDep, PrincipalDep, SettingsDep, StoreDep
from shared import file_service
from shared.schemas import FileDeleted, FileObject, ListPage

router = APIRouter(tags=["files"])  # mounted once per dialect prefix

MAX_FORM_FIELDS = 32


@router.post("/files", response_model=FileObject, openapi_extra=OPENAPI_HEADER)
async def create_file(
    request: Request, principal: PrincipalDep, store: StoreDep, blobs: BlobsDep, settings: SettingsDep
) -> Response:
    async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:
        upload = form.get("file")
        purpose = form.get("purpose")
        fields = dict(
            source=upload.file if isinstance(upload, UploadFile) else None,
            filename=upload.filename if isinstance(upload, UploadFile) else None,
            purpose=purpose if isinstance(purpose, str) else None,
            expires_anchor=_text(form.get("expires_after[anchor]")),
            expires_seconds=_text(form.get("expires_after[seconds]")),
        )

        async def create() -> FileObject:
            return await run_in_threadpool(file_service.create_file, store, blobs, settings, principal.scope, **fields)

        async def request_parts() -> list[bytes | str]:
            # The same upload is the same bytes under the same name, purpose and expiry.
            content = await run_in_threadpool(file_service.content_digest, fields["source"])
            return [content, *(str(fields[name] or "") for name in
                               ("filename", "purpose", "expires_anchor", "expires_seconds"))]

        return await respond_once(request, principal, store, settings, request_parts, create)


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


@router.get("/files", response_model=ListPage[FileObject])
def list_files(
    principal: PrincipalDep,
    store: StoreDep,
    purpose: str | None = None,
    limit: int | None = None,
    order: Literal["asc", "desc"] | None = None,
    after: str | None = None,
) -> ListPage[FileObject]:
    return file_service.list_files(store, principal.scope, purpose=purpose, limit=limit, order=order, after=after)


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, principal: PrincipalDep, store: StoreDep) -> FileObject:
    return file_service.get_file_record(store, principal.scope, file_id).file


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, principal: PrincipalDep, store: StoreDep, blobs: BlobsDep) -> FileDeleted:
    return file_service.delete_file(store, blobs, principal.scope, file_id)


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
def file_content(file_id: str, principal: PrincipalDep, store: StoreDep, blobs: BlobsDep) -> StreamingResponse:
    record, stream = file_service.file_content(store, blobs, principal.scope, file_id)
    return StreamingResponse(
        stream,
        media_type="application/octet-stream",
        headers={"content-length": str(record.file.bytes)},
    )
