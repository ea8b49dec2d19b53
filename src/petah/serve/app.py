"""The station's HTTP face (FastAPI): the /v1 API, /healthz, /metrics and the inspection page.

Every error a client can cause is ``{"error": "…"}`` with a 4xx code; nothing else (no traceback,
no internal detail) ever leaves the process, and the process stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from petah.errors import BackboneMismatch, PetahError
from petah.http import ClientError, parse_form, read_body
from petah.packages import SignatureError
from petah.serve.state import StateUnwritable
from petah.serve.station import Station, UnknownTask, Upload
from petah.serve.worker import Busy

STATIC = resources.files("petah") / "serve" / "static"
RETRY_AFTER_S = 1


def _status_of(exc: Exception) -> tuple[int, dict]:
    if isinstance(exc, UnknownTask):
        return 404, {}
    if isinstance(exc, BackboneMismatch):
        return 409, {}
    if isinstance(exc, SignatureError):
        return 403, {}
    if isinstance(exc, Busy):
        return 503, {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, StateUnwritable):
        return 503, {}
    return 400, {}


async def read_images(request: Request, limit: int, max_images: int) -> tuple[list[Upload], list[str] | None]:
    """The uploaded images (multipart field ``image``, repeatable; or one raw ``image/*`` body) and
    the ``tasks`` asked for (form field or query, comma-separated; absent: every task)."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, limit)
    tasks_field = request.query_params.get("tasks")
    if content_type.startswith("image/"):
        uploads = [Upload("body", body)]
    elif content_type.startswith("multipart/form-data"):
        form = await parse_form(request, body, max_images)
        files = form.getlist("image")
        if any(not isinstance(f, UploadFile) for f in files):
            raise ClientError(400, "the field 'image' must carry files, not text")
        uploads = [Upload(f.filename or f"image{i}", await f.read()) for i, f in enumerate(files)]
        text = form.get("tasks")
        if isinstance(text, str) and text.strip():
            tasks_field = text
    else:
        raise ClientError(415, "send images as multipart/form-data (field 'image', repeatable) or one raw "
                               "image/* body")
    if not uploads:
        raise ClientError(400, "no image: add one or more files in the multipart field 'image'")
    if len(uploads) > max_images:
        raise ClientError(400, f"{len(uploads)} images in one request; at most {max_images}")
    tasks = [t.strip() for t in tasks_field.split(",") if t.strip()] if tasks_field else None
    return uploads, tasks


def create_app(station: Station) -> FastAPI:
    config = station.config
    api_token, admin_token = config.api_token, config.admin_token

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        station.start()
        agent = None
        if config.hub:
            from petah.fleet.agent import Agent

            agent = Agent(station)
            agent.start()
        try:
            yield
        finally:  # uvicorn got SIGTERM and has finished the in-flight requests: drain and stop
            if agent is not None:
                await run_in_threadpool(agent.stop)
            await run_in_threadpool(station.stop)

    # FastAPI's /docs and /redoc load their UI from a public CDN (dead on an offline device) and its
    # /openapi.json would answer without the token: the schema is served below, behind the token
    app = FastAPI(title="petah station", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, description="One resident backbone serving every task package over HTTP.")

    def bearer_matches(header: str | None, token: str) -> bool:
        given = (header or "").removeprefix("Bearer ").strip().encode()
        return hmac.compare_digest(given, token.encode())  # constant time

    def require_api_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if api_token is not None and not bearer_matches(authorization, api_token):
            raise ClientError(401, "this station needs its bearer token (Authorization: Bearer …)",
                              {"WWW-Authenticate": "Bearer"})

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        """The admin token alone opens the admin endpoints (it is the stronger credential: one
        Authorization header cannot carry both tokens)."""
        if admin_token is None:
            raise ClientError(401, "admin endpoints are disabled: start petah serve with --admin-token-file")
        if config.hub and not config.allow_manual:
            raise ClientError(403, f"this station follows the releases of {config.hub}: changes by hand are refused "
                                   "(start it with --allow-manual to allow them)")
        if not bearer_matches(authorization, admin_token):
            raise ClientError(401, "wrong or missing admin bearer token", {"WWW-Authenticate": "Bearer"})

    # --- errors: one JSON shape, no internals --------------------------------------------------
    @app.exception_handler(ClientError)
    async def client_error(_request, exc: ClientError):
        station.metrics.observe_error(str(exc.status))
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(PetahError)
    async def petah_error(_request, exc: PetahError):
        status, headers = _status_of(exc)
        station.metrics.observe_error(str(status))
        return JSONResponse({"error": station.client_message(str(exc))}, status, headers=headers)

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
        station.metrics.observe_error("500")
        return JSONResponse({"error": "internal error (the station's log has the details)"}, 500)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        station.metrics.http.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    # --- the API -------------------------------------------------------------------------------
    @app.get("/healthz", summary="Liveness: the station answers and its inference thread runs")
    def healthz():
        alive = station.worker.alive
        return JSONResponse({"status": "ok" if alive else "inference thread stopped", "tasks": len(station.tasks)},
                            200 if alive else 503)

    @app.get("/metrics", summary="Prometheus text format", dependencies=[Depends(require_api_token)])
    def metrics():
        return Response(station.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/tasks", summary="The tasks served, with versions", dependencies=[Depends(require_api_token)])
    def tasks():
        return {"tasks": station.task_list()}

    @app.get("/v1/stats", summary="Counters the page shows", dependencies=[Depends(require_api_token)])
    def stats():
        return {**station.metrics.summary(), "engine": station.engine.name, "backbone": station.backbone.describe(),
                "queue_depth": station.worker.depth}

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_token)])
    def openapi_schema():
        return JSONResponse(app.openapi())

    @app.post("/v1/predict", summary="Every requested task's result for one or more images",
              dependencies=[Depends(require_api_token)])
    async def predict(request: Request):
        started = time.perf_counter()
        station.in_flight += 1  # only the event loop thread changes it
        try:
            uploads, names = await read_images(request, config.max_upload_bytes, config.max_images)
            tasks = station.check_tasks(names)
            job = await run_in_threadpool(station.decode, uploads, tasks)
            prediction = await asyncio.wrap_future(station.submit(job))
            images = await run_in_threadpool(station.render, prediction, uploads)
        finally:
            station.in_flight -= 1
        seconds = time.perf_counter() - started
        station.metrics.observe_prediction(tasks, seconds)
        # a JSONResponse skips FastAPI's jsonable_encoder walk over every result (plain JSON types already)
        return JSONResponse({"images": images, "latency_ms": round(1000 * seconds, 3),
                             "batch_images": prediction.batch_images})

    @app.put("/v1/tasks/{name}", summary="Install or replace a task from a .petah body (admin)",
             dependencies=[Depends(require_admin)])
    async def put_task(name: str, request: Request):
        data = await read_body(request, config.max_upload_bytes)
        if not data:
            raise ClientError(400, "empty body: send the .petah file as the request body")
        record = await run_in_threadpool(station.install, data, name)
        return {"task": record.to_dict()}

    @app.post("/v1/tasks/{name}/rollback", summary="Serve the task's previous version again (admin)",
              dependencies=[Depends(require_admin)])
    async def rollback(name: str):
        record = await run_in_threadpool(station.rollback, name)
        return {"task": record.to_dict()}

    @app.delete("/v1/tasks/{name}", summary="Stop serving a task (admin)",
                dependencies=[Depends(require_admin)])
    async def delete(name: str):
        await run_in_threadpool(station.delete, name)
        return {"deleted": name}

    # --- the page (static files: no data in them, so no token) -----------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


__all__ = ["create_app"]
