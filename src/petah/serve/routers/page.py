"""The inspection page: static files with no data in them, so no token (the page asks the API with
the token its user gives)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = resources.files("petah") / "serve" / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(str(STATIC / "index.html"))


def mount_static(app: FastAPI) -> None:
    """/static/: the page's script and style (a mount: routers do not carry one into the app)."""
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
