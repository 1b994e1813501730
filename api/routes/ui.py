"""The web dashboard: one static page that reads the JSON API with the caller's own key. It holds no data itself."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

# The page only ever talks to this origin, and nothing it shows may run as script.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
@router.get("/ui/")
def dashboard() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", headers=PAGE_HEADERS)


router.mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui-static")
