"""What the station's and the hub's FastAPI apps share: the app itself (no docs pages), one JSON
shape for every error, and bearer-token checks.

Apart from ``petah.http`` (bodies, forms, JSON, token files) because that one is imported by the
station's settings and the update agent, which have no use for FastAPI.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from petah.errors import PetahError
from petah.http import ClientError

# the Authorization request header, as an endpoint or dependency parameter
Authorization = Annotated[str | None, Header()]


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer …`` header ("" without one)."""
    return (authorization or "").removeprefix("Bearer ").strip()


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether the header carries ``token``, compared in constant time."""
    return hmac.compare_digest(bearer_token(authorization).encode(), token.encode())


def unauthorized(message: str) -> ClientError:
    """A 401 that asks for a bearer token."""
    return ClientError(401, message, {"WWW-Authenticate": "Bearer"})


def new_app(title: str, **options) -> FastAPI:
    """A FastAPI app without /docs and /redoc: their pages load the UI from a public CDN, dead on an
    offline device (``options`` go to FastAPI: lifespan, openapi_url, description…)."""
    return FastAPI(title=title, version="1", docs_url=None, redoc_url=None, **options)


def add_error_handlers(app: FastAPI, server: str, *,
                       petah_status: Callable[[PetahError], tuple[int, dict]] = lambda _exc: (400, {}),
                       client_text: Callable[[str], str] = str, count: Callable[[str], None] = lambda _status: None,
                       framework_errors: bool = True) -> None:
    """Every error as ``{"error": message}``; no traceback or internal detail leaves the process.

    ``petah_status`` gives a ``PetahError``'s status and headers (default 400), ``client_text`` the
    message a client may see, ``count`` is told the status of every ``ClientError``, ``PetahError``
    and internal error (the station's metrics). ``framework_errors``: FastAPI's own answers in the same
    shape too (404 no such path, 405 wrong method; an invalid parameter 400, not 422); without it they
    keep FastAPI's ``{"detail": …}`` (what the hub's clients get)."""

    @app.exception_handler(ClientError)
    async def client_error(_request, exc: ClientError):
        count(str(exc.status))
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(PetahError)
    async def petah_error(_request, exc: PetahError):
        status, headers = petah_status(exc)
        count(str(status))
        return JSONResponse({"error": client_text(str(exc))}, status, headers=headers)

    if framework_errors:
        @app.exception_handler(HTTPException)
        async def http_error(_request, exc: HTTPException):
            return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

        @app.exception_handler(RequestValidationError)
        async def validation_error(_request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()))
            return JSONResponse({"error": f"invalid request: {where}: {first.get('msg', 'invalid')}"}, 400)

    @app.exception_handler(Exception)
    async def internal_error(_request, _exc: Exception):
        count("500")
        return JSONResponse({"error": f"internal error (the {server}'s log has the details)"}, 500)


def static_page_router(folder) -> APIRouter:
    """``/``: a page of static files, ``folder/index.html`` (no data in it, so no token: the page
    asks the API with the token its user gives). Its script and style: ``mount_static``."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(folder / "index.html"))

    return router


def mount_static(app: FastAPI, folder) -> None:
    """/static/: a page's script and style (a mount: routers do not carry one into the app)."""
    app.mount("/static", StaticFiles(directory=str(folder)), name="static")


__all__ = ["Authorization", "add_error_handlers", "bearer_matches", "bearer_token", "mount_static", "new_app",
           "static_page_router", "unauthorized"]
