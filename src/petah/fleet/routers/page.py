"""The hub's page at ``/``: static files with no data in them, so no token; the page asks the API
with the admin token its operator gives (pause / resume / roll back take it, and the status does
when the hub has a read token)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = resources.files("petah") / "fleet" / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(str(STATIC / "index.html"))


def mount_static(app: FastAPI) -> None:
    """/static/: the page's script and style (a mount: routers do not carry one into the app)."""
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
