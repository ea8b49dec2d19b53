"""The station's HTTP face (FastAPI): the /v1 API, /healthz, /metrics and the inspection page, one
router per resource (``petah.serve.routers``), put together here.

Every error a client can cause is ``{"error": "…"}`` with a 4xx code; nothing else (no traceback,
no internal detail) ever leaves the process, and the process stays up.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from petah.errors import BackboneMismatch, PetahError
from petah.http_app import add_error_handlers, mount_static, new_app
from petah.packages import SignatureError
from petah.serve.line import Line
from petah.serve.routers import admin, captures, health, metrics, page, predict, schema, stats, tasks
from petah.serve.routers import line as line_router
from petah.serve.state import StateUnwritable
from petah.serve.station import Station, UnknownTask
from petah.serve.worker import Busy

RETRY_AFTER_S = 1


def _status_of(exc: PetahError) -> tuple[int, dict]:
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


def create_app(station: Station) -> FastAPI:
    config = station.config

    line = Line(station, config.line, station.home)
    station.line = line
    station.metrics.watch_line(line.status)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        station.start()
        line.start()
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
            await run_in_threadpool(line.stop)
            await run_in_threadpool(station.stop)

    # FastAPI's /openapi.json would answer without the token: the schema router serves it behind it
    app = new_app("petah station", lifespan=lifespan, openapi_url=None,
                  description="One resident backbone serving every task package over HTTP.")
    app.state.station = station
    app.state.api_token, app.state.admin_token = config.api_token, config.admin_token  # read once
    add_error_handlers(app, "station", petah_status=_status_of, client_text=station.client_message,
                       count=station.metrics.observe_error)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        station.metrics.http.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    # in this order: the schema lists the paths as they come
    for router in (health, metrics, tasks, stats, schema, predict, captures, line_router, admin, page):
        app.include_router(router.router)
    mount_static(app, page.STATIC)
    return app


__all__ = ["create_app"]
