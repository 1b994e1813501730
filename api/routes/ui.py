"""The web dashboard: one static page that reads the JSON API with the caller's own key. It holds no data itself."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, RedirectResponse
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


@router.get("/")
def root() -> RedirectResponse:
    """A browser pointed at the server lands on the dashboard."""
    return RedirectResponse("/ui", status_code=302)


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    """Browsers ask for it whatever the page links; the page links the same icon under /ui/static."""
    return FileResponse(UI_DIR / "favicon.svg", media_type="image/svg+xml",
                        headers={"cache-control": "public, max-age=86400"})


router.mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui-static")
